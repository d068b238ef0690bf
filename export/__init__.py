"""Export: a trained model becomes files its consumers run, each written, then proven in that consumer.

plan (toolkit.models.plans) -> write (gguf.py, llama_cpp.py for K-quants) -> verify (verify.py, in
llama.cpp through llama-cpp-python) -> report (report.py). `ollama.py` packages a GGUF with a Modelfile.
"""

from export.gguf import QUANTS, ExportResult, export_gguf
from export.ollama import OllamaResult, export_ollama

__all__ = ["QUANTS", "ExportResult", "OllamaResult", "export_gguf", "export_ollama"]
