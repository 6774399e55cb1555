"""lm-eval's log-likelihood request tokenization, with all strings of a call encoded in a few batched calls.

Why: `TemplateLM.loglikelihood` tokenizes request by request (`_encode_pair`: two `tok_encode` calls each),
which on full BBQ (211,536 requests) kept the GPU idle for about a minute (docs/performance.md). Here every
distinct string a call needs is encoded by the fast tokenizer's batch call (`tokenizer(list)`, the Rust
`encode_batch`), and lm-eval's rules are then applied to the token lists, so the result is the same token for
token (`encode_requests` returns exactly what lm-eval hands to `_loglikelihood_tokens`):

- empty context: the continuation encoded without special tokens; context = `[prefix_token_id]`, or the
  continuation's first token when that already is the prefix token (`TemplateLM.loglikelihood`);
- otherwise (`TemplateLM._encode_pair`, causal): trailing whitespace (`str.rstrip`) moves from the context to
  the continuation, `context + continuation` and `context` are encoded whole, and the continuation's tokens
  are the whole encoding after the context's length;
- each encoding uses `HFLM.tok_encode`'s special-token rule: `add_special_tokens=add_bos_token` when that is
  set, and False for a string that already starts with the decoded prefix token.

Why this is exact: for a fast tokenizer `tokenizer.encode(s, **kw)` and `tokenizer([s, ...], **kw)` both run
`_encode_plus`, i.e. the same Rust `encode_batch` with the same options (no padding, no truncation); the
batch only runs several strings at once. `batchable` refuses anything where that does not hold (slow
tokenizers, a tokenizer class that overrides `encode`/`__call__`/`_encode_plus`, a model class with its own
`_encode_pair`, seq2seq backends); callers then keep lm-eval's own per-request path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PARALLELISM = "TOKENIZERS_PARALLELISM"
CHUNK = 8192  # strings per tokenizer call: bounds the transient BatchEncoding, large enough to amortize overhead
TokenRequest = tuple[tuple[str, str], list[int], list[int]]
# (string, add_special_tokens given to tok_encode): None is lm-eval's default, False the empty-context case.
_Key = tuple[str, bool | None]


def batchable(lm: Any, same_tok_encode: Sequence[Callable[..., Any]] = ()) -> bool:
    """Whether `encode_requests` gives lm-eval's tokens for this model: a causal HFLM using `HFLM.tok_encode`
    (or an override listed in `same_tok_encode` that only memoizes it) and `TemplateLM._encode_pair`, on a
    fast tokenizer whose single-string `encode` and batch `__call__` share transformers' `_encode_plus`
    (a tokenizer with source/target modes switches mode in `__call__` only, so it is refused)."""
    tokenizer = getattr(lm, "tokenizer", None)
    kind: Any = type(tokenizer)
    return (
        getattr(lm, "backend", None) == "causal"
        and type(lm)._encode_pair is TemplateLM._encode_pair
        and (type(lm).tok_encode is HFLM.tok_encode or type(lm).tok_encode in same_tok_encode)
        and not hasattr(tokenizer, "_switch_to_input_mode")
        and isinstance(tokenizer, PreTrainedTokenizerFast)
        and bool(getattr(tokenizer, "is_fast", False))
        and kind.encode is PreTrainedTokenizerBase.encode
        and kind.__call__ is PreTrainedTokenizerBase.__call__
        and kind._encode_plus is PreTrainedTokenizerFast._encode_plus
    )


def encode_requests(lm: HFLM, pairs: Sequence[tuple[str, str]], chunk: int = CHUNK,
                    threads: bool = True) -> list[TokenRequest]:
    """`TemplateLM.loglikelihood`'s `(pair, context_ids, continuation_ids)` list for `pairs`, encoded in
    batches (on the Rust tokenizer's thread pool unless `threads` is False: `rust_threads`). Only valid where
    `batchable(lm)`; raises what lm-eval raises (IndexError for an empty continuation after an empty context)."""
    keys: dict[_Key, None] = {}
    for context, continuation in pairs:
        if context == "":
            keys[(continuation, False)] = None
        else:
            head, tail = _move_whitespace(context, continuation)
            keys[(head + tail, None)] = None
            keys[(head, None)] = None
    ids = _encode_all(lm, list(keys), chunk, threads)
    prefix = lm.prefix_token_id
    out: list[TokenRequest] = []
    for context, continuation in pairs:
        if context == "":
            cont = ids[(continuation, False)]
            context_enc, continuation_enc = ([prefix], list(cont)) if prefix != cont[0] else (cont[:1], cont[1:])
        else:
            head, tail = _move_whitespace(context, continuation)
            context_enc = list(ids[(head, None)])
            continuation_enc = ids[(head + tail, None)][len(context_enc):]
        out.append(((context, continuation), context_enc, continuation_enc))
    return out


def _move_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """`_encode_pair`'s first step: the context's trailing whitespace (as `str.rstrip` sees it) starts the
    continuation instead, so the continuation's first word keeps its leading space."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def _encode_all(lm: HFLM, keys: Sequence[_Key], chunk: int, threads: bool) -> dict[_Key, list[int]]:
    """Token ids of each (string, add_special_tokens) key, with `HFLM.tok_encode`'s keyword arguments: keys
    that resolve to the same arguments share batched tokenizer calls of up to `chunk` strings."""
    bos = lm.tokenizer.decode(lm.prefix_token_id)
    by_kwargs: dict[tuple[tuple[str, Any], ...], list[_Key]] = {}
    for key in keys:
        by_kwargs.setdefault(_tok_encode_kwargs(lm, key, bos), []).append(key)
    ids: dict[_Key, list[int]] = {}
    with rust_threads() if threads else nullcontext():
        for kwargs, members in by_kwargs.items():
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                encoded = lm.tokenizer([s for s, _ in part], return_attention_mask=False,
                                       return_token_type_ids=False, **dict(kwargs))["input_ids"]
                ids.update(zip(part, _as_lists(encoded), strict=True))
    return ids


@contextmanager
def rust_threads() -> Iterator[None]:
    """The Rust tokenizer's thread pool for the enclosed batch calls (`encode_batch` splits a batch over it;
    the order of the results is the input order, so the ids are the same), whatever TOKENIZERS_PARALLELISM
    says outside them.

    Why scoped: the audit keeps TOKENIZERS_PARALLELISM=false for everything else (a process that forks after the
    pool ran would warn, and lm-eval and datasets fork), but BBQ's 211,536 requests are the largest host-side
    cost of a GPU evaluation (docs/performance.md). The previous value is back on exit, so a later fork sees
    parallelism configured off and the tokenizers library disables the pool in the child quietly."""
    previous = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = previous


def _tok_encode_kwargs(lm: HFLM, key: _Key, bos: str) -> tuple[tuple[str, Any], ...]:
    """The keyword arguments `HFLM.tok_encode(string, add_special_tokens)` passes to `tokenizer.encode`."""
    string, add_special_tokens = key
    kwargs = _add_special_kwargs(add_special_tokens, lm.add_bos_token)
    if add_special_tokens is None and has_bos_prefix(string, bos):
        kwargs["add_special_tokens"] = False
    return tuple(sorted(kwargs.items()))


def _as_lists(encoded: Iterable[Any]) -> list[list[int]]:
    return [list(row) for row in encoded]
