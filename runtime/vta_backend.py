"""vta_sim: a CNN artifact's int8 program with its fabric layers on the simulated VTA bitstream.

What the `fpga` target lowered (`targets/fpga/`) opened as a `FabricModel` (runtime/cnn_fabric.py):
each fabric layer's binary stream executed by the bit-exact simulator, the host steps in numpy.
Its files are the whole target folder, checked against the manifest before it opens.
"""

from __future__ import annotations

from pathlib import Path

from accelc.runtime.backends import Backend, register_backend


@register_backend
class VtaSimBackend(Backend):
    """The int8 CNN on the simulated VTA fabric (streams, micro-ops and DRAM images from the artifact)."""

    name = "vta_sim"
    roles = ("target",)
    families = ("cnn",)

    def held_roles(self) -> dict[str, Path]:
        return {"target": self.placement.directory}

    def files(self, role: str) -> list[Path]:
        return [self.placement.directory]

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False):
        from accelc.runtime.cnn_fabric import FabricModel

        return FabricModel(self.placement.directory)
