"""What `toolkit eval SRC` evaluates, and through which consumer: each kind of SRC becomes an lm-eval model
object that runs the artifact the way it is deployed.

    run / stage / HF folder   lm-eval's HF model class on the model (any registered architecture)
    GGUF file                 `forge-gguf` (eval/gguf_lm.py): llama-cpp-python's server for generation,
                              llama.cpp's logits for log-likelihoods
    vLLM folder               `vllm serve` from the vLLM environment (`make vllm-env`) with lm-eval's
                              `local-completions` client (token ids, echoed prompt log-probabilities);
                              without that environment, transformers (and the results say so)
    Hub id (org/name)         lm-eval's HF model class on `from_pretrained(id)`, safetensors only, no remote code

Results of SRC go to its eval folder: `SRC/eval/` for a folder, `<folder of the file>/eval/<file stem>/` for a
GGUF file, `./eval/<org>--<name>/` for a Hub id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Artifact:
    """One SRC of `toolkit eval`, resolved: `kind` is hf, gguf, vllm or hub; `path` what is evaluated."""

    src: str
    kind: str
    path: str
    eval_dir: Path
    dtype: str | None = None

    @contextmanager
    def lm(self, chat_template: bool = False) -> Iterator[Any]:
        """The lm-eval model object for this artifact, with its server running for the block if it has one."""
        if self.kind == "gguf":
            from eval.gguf_lm import GGUFLM
            from eval.servers import llama_cpp_server

            context = gguf_context(self.path)
            with llama_cpp_server(Path(self.path), self.eval_dir / "llama-server.log", context) as url:
                yield GGUFLM(gguf=self.path, base_url=url, context=context)
        elif self.kind == "vllm":
            with vllm_lm(Path(self.path), self.eval_dir / "vllm-server.log") as lm:
                yield lm
        else:
            from eval.harness import hf_lm

            yield hf_lm(*self.load())

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer) of an hf or hub artifact, in transformers; sets `dtype` from the model."""
        import torch

        from eval.stages import load_model_folder

        model, tokenizer = load_model_folder(self.path)
        if torch.cuda.is_available():  # lm-eval, generation and perplexity run where the model is
            model = model.to("cuda")
        self.dtype = str(model.dtype).removeprefix("torch.")
        return model, tokenizer


def gguf_context(path: str | Path) -> int:
    """The training context length a GGUF file declares (`<arch>.context_length`), 2048 if it declares none."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields.get("general.architecture")
    name = bytes(arch.parts[arch.data[0]]).decode() if arch else ""
    field = reader.fields.get(f"{name}.context_length")
    return int(field.parts[field.data[0]][0]) if field else 2048


def gguf_dtype(path: str | Path) -> str:
    """The file's type as its name for it (`general.file_type`: f32, f16, q8_0, q4_k_m, ...)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def is_vllm_export(folder: Path) -> bool:
    """A folder `toolkit export vllm` wrote (its export_report.json says so)."""
    report = folder / "export_report.json"
    if not report.exists():
        return False
    # Only `toolkit export vllm` writes this file; reports before "target" was recorded have "form".
    content = json.loads(report.read_text())
    return content.get("target", "vllm" if "form" in content else None) == "vllm"


def resolve(src: str) -> Artifact:
    """SRC as an Artifact; an error naming SRC when it is none of the kinds (see the module docstring)."""
    from toolkit.run_folder import model_folder_of

    path = Path(src)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ToolkitError(f"{src}: no such GGUF file")
        return Artifact(src, "gguf", str(path.resolve()), path.parent / "eval" / path.stem, gguf_dtype(path))
    if path.exists():
        if is_vllm_export(path) and (path / "merged" / "config.json").exists():
            folder = path / "merged"  # a LoRA run's export: the merged model (vLLM serves it as it is)
        else:
            folder, _ = model_folder_of(path)
        if is_vllm_export(folder) or folder == path / "merged":
            from export.verify_vllm import DISABLED, PYTHON_ENV, vllm_executable

            # FORGE_VLLM_PYTHON=none: no vLLM for this process (the tests outside `vllm`-marked ones)
            if os.environ.get(PYTHON_ENV) != DISABLED and vllm_executable() is not None:
                return Artifact(src, "vllm", str(folder.resolve()), path / "eval")
        return Artifact(src, "hf", str(folder.resolve()), path / "eval")
    if HUB_ID.match(src):
        return Artifact(src, "hub", src, Path("eval") / src.replace("/", "--"))
    raise ToolkitError(
        f"{src} is not a model, stage or run folder, a .gguf file, a vLLM folder or a Hub id (org/name)"
    )


@contextmanager
def vllm_lm(folder: Path, log: Path) -> Iterator[Any]:
    """`vllm serve` on a vLLM export (the command `toolkit serve` prints) and lm-eval's `local-completions`
    client on it, with the folder's tokenizer: vLLM's completions endpoint takes token ids and echoes the
    prompt's log-probabilities, which is what lm-eval's client was written for."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from eval.servers import free_port, server
    from export.serve import serve_command
    from export.verify_vllm import server_environ, vllm_executable

    port = free_port()
    argv = serve_command(folder, host="127.0.0.1", port=port)
    argv[0] = str(vllm_executable())  # as `toolkit serve --run` does: on PATH, else the vLLM environment's
    config = json.loads((folder / "config.json").read_text())
    env = server_environ(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    with server(argv, port, log, env) as url:
        yield LocalCompletionsAPI(
            base_url=f"{url}/v1/completions",
            model=argv[argv.index("--served-model-name") + 1],
            tokenizer_backend="huggingface",
            tokenizer=str(folder),
            tokenized_requests=True,
            max_length=config.get("max_position_embeddings", 2048),
            num_concurrent=1,
            max_retries=1,
            timeout=600,
        )
