"""lm-eval on a GGUF file as llama.cpp runs it: lm-eval's model `forge-gguf`.

Generation (`generate_until`) is lm-eval's own OpenAI completions client (`local-completions`, unchanged)
talking to llama-cpp-python's server on the file, with text prompts: the server tokenizes them with the
file's tokenizer, and the chat template (when on) is the one stored in the file, rendered by llama-cpp-python's
own template renderer. What a user of llama.cpp or Ollama gets is what is scored, so a broken tokenizer or
template in the file shows as a lower score.

Log-likelihoods (multiple choice, rolling perplexity) come from llama.cpp's logits in this process, the same
library the server runs, tokenized by the file's tokenizer. They cannot go through the server: lm-eval's
completions client sends token ids, which llama-cpp-python's server refuses (its `prompt` is text only), and
the server's echoed prompt log-probabilities are one position off when the prompt has no BOS token (llama-cpp-
python 0.3.36 reports, for token i, the log-probability of token i under the distribution *after* it:
measured on a 20-token prompt, -4.31 where the model gives -5.78), so they are not the model's likelihood.
Scoring follows lm-eval's HF model class: the same context/continuation split, windows and prefix token, so a
float GGUF scores as its checkpoint does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI

NAME = "forge-gguf"


@register_model(NAME)
class GGUFLM(LocalCompletionsAPI):
    """A GGUF file: generation through llama-cpp-python's server at `base_url`, log-likelihoods from
    llama.cpp's logits (see the module docstring)."""

    def __init__(
        self, gguf: str, base_url: str, context: int, n_threads: int | None = None, **kwargs: Any
    ) -> None:
        from export.llama_cpp import load_for_verification

        self.path = Path(gguf)
        self.context = context  # the file's training context (eval.artifacts.gguf_context)
        # f32 KV cache, logits for every position: log-likelihoods of the file, not of an f16 cache
        self.llama = load_for_verification(self.path, n_ctx=self.context, n_threads=n_threads)
        self.template = self.llama.metadata.get("tokenizer.chat_template")
        super().__init__(
            base_url=f"{base_url}/v1/completions",
            model=self.path.name,
            tokenizer_backend=None,  # text prompts: the server tokenizes with the file's tokenizer
            tokenized_requests=False,
            eos_string=self._text(self.llama.token_eos()),
            max_length=self.context,
            num_concurrent=1,
            max_retries=1,
            timeout=600,
            **kwargs,
        )

    def _text(self, token: int) -> str:
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    # --- tokenization: the file's own tokenizer -------------------------------------------------------
    def tok_encode(self, string: str | list[str], **kwargs: Any) -> list[int] | list[list[int]]:
        if isinstance(string, list):
            return [self.tok_encode(s) for s in string]
        return self.llama.tokenize(string.encode("utf-8"), add_bos=False, special=True)

    @property
    def prefix_token_id(self) -> int:
        """The token before an empty context: BOS when the file has one, else EOS (as lm-eval's HF class)."""
        bos = self.llama.token_bos()
        return bos if bos >= 0 else self.llama.token_eos()

    @property
    def eot_token_id(self) -> int:
        return self.llama.token_eos()

    @property
    def tokenizer_name(self) -> str:
        return str(self.path)

    @property
    def chat_template(self) -> Any:
        return self.template

    def chat_template_name(self) -> str:  # lm-eval records it with the results
        return str(self.path)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered by the chat template stored in the file, as llama-cpp-python renders it
        for its chat endpoint (and Ollama from the same template)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from toolkit.errors import ExportError

        if not self.template:
            raise ExportError(f"{self.path} has no chat template (tokenizer.chat_template); run without it")
        bos, eos = self.llama.token_bos(), self.llama.token_eos()
        formatter = Jinja2ChatFormatter(
            template=self.template,
            eos_token=self._text(eos),
            bos_token=self._text(bos) if bos >= 0 else "",
            add_generation_prompt=add_generation_prompt,
        )
        return formatter(messages=chat_history).prompt

    # --- log-likelihoods from llama.cpp's logits ------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per request:
        the context and continuation, left-truncated to the model's context plus one, as lm-eval's HF class."""
        from export.llama_cpp import llama_logits
        from export.verify import log_softmax

        results = []
        for cache_key, context, continuation in requests:
            tokens = (context + continuation)[-(self.context + 1) :][:-1]
            logprobs = log_softmax(llama_logits(self.llama, tokens)[-len(continuation) :])
            target = np.asarray(continuation)
            answer = (
                float(logprobs[np.arange(len(target)), target].sum()),
                bool((logprobs.argmax(axis=-1) == target).all()),
            )
            results.append(answer)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each document scored whole, in windows of the model's context, every token once (lm-eval's HF class's
        windows: `max_seq_len` the full context, one token of context, the prefix token first)."""
        from lm_eval import utils

        totals = []
        for (string,) in [request.args for request in requests]:
            windows = [
                (None, *window)
                for window in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.context,
                        context_len=1,
                    ),
                )
            ]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals
