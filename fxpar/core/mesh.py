"""What passes know about the device mesh: names, sizes, groups, this rank's place.

Passes never touch a `DeviceMesh` directly; they read a `MeshInfo`, which can be
built from a real mesh (`MeshInfo.from_device_mesh`) or from sizes alone for
dry runs and structure tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxpar.core.errors import PlanError

__all__ = ["MeshInfo", "KNOWN_DIM_NAMES"]

KNOWN_DIM_NAMES = ("dp", "fsdp", "ep", "pp", "tp")


@dataclass(frozen=True)
class MeshInfo:
    """An immutable description of a device mesh.

    Attributes:
        names: the mesh dim names, in mesh order.
        sizes: the size of each mesh dim.
        coordinate: this rank's index along each mesh dim (None for dry runs).
        group_names: the c10d group name of each mesh dim's process group for
            this rank (None for dry runs).
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    coordinate: tuple[int, ...] | None = None
    group_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes):
            raise PlanError(f"mesh has {len(self.sizes)} dims but {len(self.names)} names: {self.names}")
        unknown = [n for n in self.names if n not in KNOWN_DIM_NAMES]
        if unknown:
            raise PlanError(
                f"mesh dim names {unknown} are not recognised; name mesh dims from {KNOWN_DIM_NAMES} "
                "(init_device_mesh(..., mesh_dim_names=(...)))"
            )
        if len(set(self.names)) != len(self.names):
            raise PlanError(f"mesh dim names repeat: {self.names}")

    @classmethod
    def from_device_mesh(cls, mesh) -> "MeshInfo":
        """Reads a torch `DeviceMesh`; a 1-D mesh without names is `tp`."""
        names = mesh.mesh_dim_names
        if names is None:
            if mesh.ndim != 1:
                raise PlanError(
                    f"a {mesh.ndim}-D mesh needs mesh_dim_names from {KNOWN_DIM_NAMES}; "
                    "only a 1-D mesh without names is taken as 'tp'"
                )
            names = ("tp",)
        coordinate = mesh.get_coordinate()
        group_names = tuple(mesh.get_group(i).group_name for i in range(mesh.ndim))
        return cls(tuple(names), tuple(mesh.shape), tuple(coordinate) if coordinate else None, group_names)

    @classmethod
    def from_sizes(cls, sizes: dict[str, int]) -> "MeshInfo":
        """A dry-run mesh: {'dp': 2, 'tp': 4} with no process groups."""
        return cls(tuple(sizes), tuple(int(s) for s in sizes.values()))

    @property
    def ndim(self) -> int:
        return len(self.names)

    def has(self, name: str) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        """The mesh dim index of `name`; a PlanError if the mesh has no such dim."""
        if name not in self.names:
            raise PlanError(
                f"the plan needs a '{name}' mesh dim but the mesh has {self.names}; "
                f"add '{name}' to mesh_dim_names or drop that part of the plan"
            )
        return self.names.index(name)

    def size(self, name: str) -> int:
        return self.sizes[self.index(name)] if name in self.names else 1

    def group_name(self, dim: int) -> str:
        if self.group_names is None:
            raise PlanError("this mesh has no process groups (a dry run); it cannot run collectives")
        return self.group_names[dim]

    def __str__(self) -> str:
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(self.names, self.sizes)) + ")"
