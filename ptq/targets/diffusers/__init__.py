"""The diffusers file target (BFL / ModelOpt layout read by ``from_single_file``): layout facts, writer, reader,
loader and ``ptq inspect`` checks."""

from ptq.targets.diffusers import checks  # noqa: F401 - registers its ptq inspect checks
from ptq.targets.diffusers.target import DiffusersBFLTarget

DIFFUSERS = DiffusersBFLTarget()

__all__ = ["DIFFUSERS", "DiffusersBFLTarget"]
