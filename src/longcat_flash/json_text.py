"""json.loads for JSON that users and clients write: every refusal is a json.JSONDecodeError saying why.

json.loads raises other exceptions on some input: RecursionError past Python's nesting limit, a plain ValueError for
an integer of more than 4300 digits (its message advises raising an interpreter limit), UnicodeDecodeError for bytes
that are not UTF-8. Callers that name a file's line or a request's field catch one exception for all of them.

This module imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import json
import sys
from typing import Any


def loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise json.JSONDecodeError(f"not valid UTF-8 (byte {err.start})", "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        raise json.JSONDecodeError(f"a number with more than {sys.get_int_max_str_digits()} digits", "", 0) from None
