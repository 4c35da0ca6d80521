"""minphi3.chat: the figures a chat turn reports, down to a one-token answer."""

import re

import numpy as np
import pytest
from tiny_checkpoints import save_tiny, save_tiny_tokenizer

import minphi3
from minphi3.chat import ChatSession
from minphi3.cli import main


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Phi-3 checkpoint with a ChatML byte-level tokenizer in its folder."""
    folder = save_tiny(tmp_path_factory.mktemp("chat"), vocab_size=300, max_position_embeddings=256)
    return save_tiny_tokenizer(folder, 300)


def test_one_token_answer_has_a_finite_rate(chat_model):
    """One new token: no decoding step, yet tokens_per_second is a number (that token's rate)."""
    session = ChatSession(minphi3.load(chat_model), minphi3.load_tokenizer(chat_model), max_new_tokens=1)
    _, stats = session.ask("Hello")
    assert stats.new_tokens == 1
    assert np.isfinite(stats.tokens_per_second) and stats.tokens_per_second > 0
    assert stats.tokens_per_second == pytest.approx(1 / stats.prefill_seconds)


def test_chat_figures_line_of_a_one_token_answer_shows_a_rate(chat_model, capsys):
    """`minphi3 chat --max-new-tokens 1` printed "nan tokens/s"; the line must show a real rate."""
    assert main(["chat", "--model", str(chat_model), "--prompt", "Hello", "--max-new-tokens", "1"]) == 0
    figures = [line for line in capsys.readouterr().err.splitlines() if "tokens/s" in line]
    assert len(figures) == 1 and "1 new tokens" in figures[0], figures
    rate = re.search(r", (\S+) tokens/s\]$", figures[0]).group(1)
    assert rate != "nan" and float(rate) > 0, figures[0]


def test_every_turn_checks_the_memory_of_its_cache(chat_model, monkeypatch):
    """A long conversation grows the cache: the memory is checked before each turn, not only the
    first, and a turn that cannot fit is a ResourceError that leaves the session usable."""
    from minphi3 import chat

    model, tokenizer = minphi3.load(chat_model), minphi3.load_tokenizer(chat_model)
    session = ChatSession(model, tokenizer, max_new_tokens=4)
    asked = []
    real = chat.check_cache_memory
    monkeypatch.setattr(chat, "check_cache_memory", lambda config, batch, tokens, *rest: asked.append(tokens) or real(config, batch, tokens, *rest))
    session.ask("Hello there")
    session.ask("And again")
    assert len(asked) == 2 and asked[1] > asked[0]
    session.reset()
    session.cache = model.new_cache(1, 200)  # room enough: a turn that allocates nothing is not checked
    session.ask("Hello there")
    assert len(asked) == 2
    session.cache = None

    def refuse(*args):
        raise minphi3.ResourceError("the KV cache for 1 x N tokens needs more than is available")

    monkeypatch.setattr(chat, "check_cache_memory", refuse)
    with pytest.raises(minphi3.ResourceError):
        session.ask("A third turn")
    monkeypatch.setattr(chat, "check_cache_memory", real)
    answer, _ = session.ask("A third turn")
    assert isinstance(answer, str)
