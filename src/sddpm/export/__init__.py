"""Export of trained models to formats other simulators and hardware read (NIR)."""

from .nir import NIRExportError, export_nir, nir_head, read_nir, write_nir

__all__ = ["NIRExportError", "export_nir", "nir_head", "read_nir", "write_nir"]
