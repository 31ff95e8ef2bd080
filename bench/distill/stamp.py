"""Which weights a bench row measured: a row kept from an earlier run is reused only while the model it
names (``--model``: a shipped name or a folder) still has the same files, so a shipped student replaced
under its name is measured again, not reported with its predecessor's figures."""

from __future__ import annotations


def model_stamp(args: list[str]) -> str:
    """``velodiff.eval.reference.model_hash`` of the model a ``velodiff eval shapes`` argument list names."""
    from velodiff.eval.reference import model_hash
    from velodiff.shipped import resolve_model

    return model_hash(resolve_model(args[args.index("--model") + 1]))
