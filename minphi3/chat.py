"""A multi-turn chat over the chat template, reusing the KV cache between turns.

Token ids are the source of truth: each turn renders the whole conversation with the
checkpoint's own template, keeps the cached keys of the longest prefix it shares with what the
cache already holds, and feeds only the rest. Re-rendering can differ from the ids the model
generated (an answer re-tokenized, whitespace around special tokens), so the shared prefix is
computed, never assumed.
"""

from __future__ import annotations

import numpy as np

from .errors import GenerationError
from .generate import GenerationStats, TextStreamer, generate
from .loading import check_cache_memory


def common_prefix_length(a, b) -> int:
    """How many leading ids two sequences share."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class ChatSession:
    """One conversation with a model: messages, the cache, and the ids the cache holds."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, max_new_tokens: int = 256, **sampling):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.messages: list[dict] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.cache = None
        self.cached_ids: list[int] = []
        self.last_reused_tokens = 0  # prompt tokens of the last turn that the cache already held
        self.stop_ids = tokenizer.stop_token_ids(model.generation_config)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.cache = None
        self.cached_ids = []

    def ask(self, text: str, on_text=None) -> tuple[str, GenerationStats]:
        """Add a user turn, generate the answer (streamed to `on_text`), add it to the conversation."""
        if not text.strip():
            raise GenerationError("empty message: type something to send")
        messages = self.messages + [{"role": "user", "content": text}]
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        context = self.model.config.max_position_embeddings
        room = context - len(prompt_ids)
        if room <= 0:
            raise GenerationError(
                f"the conversation ({len(prompt_ids)} tokens) fills the model's context of {context} tokens; "
                "start a new chat (/reset)"
            )
        max_new_tokens = min(self.max_new_tokens, room)
        self._reuse_cache(prompt_ids, max_new_tokens)
        stats = GenerationStats()
        streamer = TextStreamer(self.tokenizer, callback=on_text or (lambda piece: None), stop_ids=self.stop_ids)
        ids = generate(
            self.model,
            [prompt_ids],
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            streamer=streamer,
            cache=self.cache,
            stats=stats,
            **self.sampling,
        )[0]
        stats.prompt_tokens = len(prompt_ids)
        answer_ids = [int(t) for t in ids[len(prompt_ids):] if int(t) not in self.stop_ids]
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.cached_ids = [int(t) for t in np.asarray(ids)[: self.cache.length]]
        return answer, stats

    def _reuse_cache(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.last_reused_tokens = 0
        # Every turn that must grow the cache, not only the first: generate reserves the whole
        # turn's room up front, and the memory for it must be there before it does.
        tokens = len(prompt_ids) + max_new_tokens
        window = self.model.config.sliding_window
        slots = tokens if window is None else min(tokens, window)
        if self.cache is None or slots > self.cache.capacity:
            check_cache_memory(self.model.config, 1, tokens, self.model.dtype, self.model.xp)
        if self.cache is None:
            self.cache = self.model.new_cache(1, len(prompt_ids) + max_new_tokens)
            self.cached_ids = []
            return
        # Keep what is shared, but feed at least the last prompt token: its logits start the answer.
        keep = min(common_prefix_length(self.cached_ids, prompt_ids), len(prompt_ids) - 1)
        if not self.cache.rewind(keep):
            keep = 0
        self.cached_ids = self.cached_ids[:keep]
        self.last_reused_tokens = keep
