"""json.loads for JSON that users and clients write: every refusal is a json.JSONDecodeError saying why.

json.loads raises other exceptions on some input: RecursionError past Python's nesting limit, a plain ValueError for
an integer of more than 4300 digits (its message advises raising an interpreter limit), UnicodeDecodeError for bytes
that are not UTF-8. Callers that name a file's line or a request's field catch one exception for all of them; those
refusals carry no position (`lineno` None), since json does not say where they happened.

This module imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import json
import sys
from typing import Any


class Unplaced(json.JSONDecodeError):
    """A refusal json.loads gives no position for: its text is the reason alone."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "", 0)
        self.lineno = self.colno = None

    def __str__(self) -> str:
        return self.msg


def loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise Unplaced(f"not valid UTF-8 (byte {err.start})") from None
    except RecursionError:
        raise Unplaced("nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        raise Unplaced(f"a number with more than {sys.get_int_max_str_digits()} digits") from None
