"""A request's prompt as token ids: a chat rendered with the model's template (tools and prefill included), or
completions prompts as vLLM reads them; text that cannot fit the context refused before it is tokenized. Runs off
the event loop."""
from __future__ import annotations

from datetime import datetime

from ..tokenizer import RenderedChat, Tokenizer
from . import protocol as p
from .errors import APIError
from .tools import ToolPlan, template_drops


def fits(tokenizer: Tokenizer, chars: int, context: int, param: str, what: str | None = None,
          scoring: bool = False) -> None:
    """Refuses text that cannot fit the context whatever its tokens, before spending time on tokenizing it. `what`
    names the text when it is more than `param` (a chat prompt is rendered from the messages and the tools);
    `scoring`: it may fill the context (max_tokens 0)."""
    if why := tokenizer.cannot_fit(chars, context, scoring):
        raise APIError(400, f"{what or param}: {why}", param=param, code="context_length_exceeded")


def chat_prompt(tokenizer: Tokenizer, body: p.ChatCompletionRequest, plan: ToolPlan, context: int) -> list[int]:
    """The rendered conversation, tools included, then the plan's prefill (the model continues from it). Only the
    template's special tokens are parsed: `</s>` inside a message is text. Runs off the event loop."""
    # as sft renders them: no null fields (templates test `'tool_calls' in message`), content kept
    history = [{k: v for k, v in m.model_dump().items() if v is not None or k == "content"} for m in plan.history]
    try:
        opened = body.add_generation_prompt and not body.continue_final_message  # the reply's turn
        chat = tokenizer.render_chat(history, opened, tools=plan.shown, suffix=plan.prefill, now=datetime.now())
        if body.continue_final_message:
            chat = left_open(chat, history[-1]["content"])
        if dropped := template_drops(tokenizer, history, plan.shown):
            raise APIError(400, f"this model's chat template {dropped[1]}", param=dropped[0])
    except ValueError as err:
        raise APIError(400, str(err), param="messages") from None
    fits(tokenizer, len(chat.text), context, "messages",
          "the prompt rendered from messages and tools" if plan.shown else "the prompt rendered from messages")
    return tokenizer.encode_chat(chat)[0]


def left_open(chat: RenderedChat, final: str) -> RenderedChat:
    """The rendered conversation cut right after its final message's text (what the template wrote after it, the
    end of the turn, goes), so that the reply continues that message: transformers' `continue_final_message`."""
    end = chat.text.rfind(final)
    if end < 0:
        raise APIError(400, "continue_final_message: this model's chat template does not write the final message's "
                            "text as it is, so it cannot be continued", param="continue_final_message")
    end += len(final)
    return RenderedChat(chat.text[:end], tuple(s for s in chat.specials if s[1] <= end))


def completion_prompts(tokenizer: Tokenizer, prompts: list[str | list[int]], context: int,
                        add_special_tokens: bool = True) -> list[list[int]]:
    """Each prompt's ids: token-id prompts as they are; text with its special-token text parsed (`<s>` is bos), and
    with `add_special_tokens` what the tokenizer's post-processor adds (a bos for Llama-style tokenizers), as vLLM
    and HF tokenizers read a raw prompt (lm_eval's untokenized windows start with the bos text). Chat messages
    differ: only the template's special tokens are special there. Runs off the event loop."""
    for i, prompt in enumerate(prompts):  # scored (max_tokens 0), a prompt may fill the context; `check` refuses
        if isinstance(prompt, str):  # the rest
            fits(tokenizer, len(prompt), context, "prompt" if len(prompts) == 1 else f"prompt.{i}", scoring=True)
    texts = [prompt for prompt in prompts if isinstance(prompt, str)]
    encoded = iter(tokenizer.encode_batch(texts, allow_special=True, add_special_tokens=add_special_tokens)
                   if texts else [])
    return [prompt if isinstance(prompt, list) else next(encoded) for prompt in prompts]
