"""The `lattice` architecture (a teacher's embeddings through a 3D lattice of gMLP cells); its export plan lives
beside it."""

from toolkit.models.registry import lazy_classes

# Imported on first access: the export plan (export_plan.py) is read without the modelling code.
__getattr__ = lazy_classes(
    __name__,
    {
        "LatticeConfig": "configuration_lattice",
        "LatticeModel": "modeling_lattice",
        "LatticePreTrainedModel": "modeling_lattice",
    },
)

__all__ = ["LatticeConfig", "LatticeModel", "LatticePreTrainedModel"]
