"""What every converter shares: reading weight files without running code, renaming keys by a declarative
table, checking keys and shapes against the target module, and writing the result atomically.

A key-mapping table is a sequence of `(pattern, replacement)` pairs, as in transformers' conversion scripts:
each source key takes the replacement of the first pattern that matches it whole (`re.fullmatch`, with
`\\1`-style groups), and a replacement of None drops the key. A key that no pattern matches is reported.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..checkpoints import check_safetensors_file, read_json_object
from ..errors import InputError
from ..fileio import atomic_write_folder
from ..modeling.modeling_llm2vec4cxr import CheckpointMismatchError

KeyMapping = Sequence[tuple[str, str | None]]

# How many keys an error message lists before it says how many there are in all.
_SHOWN = 20


def shown(keys: Iterable[str]) -> str:
    """The first keys, sorted, for an error message."""
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f" ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def rename_keys(keys: Iterable[str], mapping: KeyMapping) -> tuple[dict[str, str | None], list[str]]:
    """`({key: new name, or None when dropped}, [keys no pattern matches])` for a key-mapping table."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in mapping]
    renamed, unmatched = {}, []
    for key in keys:
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match:
                renamed[key] = None if replacement is None else match.expand(replacement)
                break
        else:
            unmatched.append(key)
    return renamed, unmatched


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of a PyTorch pickle loaded with `torch.load(weights_only=True)`.

    A training checkpoint `{"state_dict": ..., "optimizer": ...}` gives its `state_dict`; a `module.` prefix
    (DistributedDataParallel) is removed. A pickle that needs arbitrary code to load is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No state dict file at {path}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors_file(path)  # a truncated, empty or pickled file: CorruptFileError naming it
        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is a pickle that needs code to load, which is refused: a file that needs arbitrary code to "
            f"load could execute anything (torch.load(weights_only=True): {str(error).splitlines()[0]}). Only plain "
            "tensors can be read: in an environment you trust, load it and re-save `torch.save(state_dict, "
            "'weights.pt')` with tensor values only, or save it as safetensors."
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors).")
    not_tensors = sorted(key for key, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: these entries are not tensors, so it is not a state dict: {shown(not_tensors)}.")
    state_dict = dict(loaded)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hub folder: `model.safetensors`, its shards, or `pytorch_model.bin`."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        check_safetensors_file(single)
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        weights = {}
        for shard in shards:
            check_safetensors_file(folder / shard)
            weights.update(load_file(folder / shard))
        return weights
    if (folder / "pytorch_model.bin").is_file():
        return load_state_dict_file(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin."
    )


def check_keys(what: str, given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    """Raise `CheckpointMismatchError` naming the missing, unexpected and mis-shaped keys of `given`."""
    problems = []
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    mismatched = [
        f"{key} (checkpoint {tuple(given[key].shape)} vs expected {tuple(expected[key])})"
        for key in sorted(set(given) & set(expected))
        if tuple(given[key].shape) != tuple(expected[key])
    ]
    if missing:
        problems.append(f"missing keys: {shown(missing)}")
    if unexpected:
        problems.append(f"unknown keys: {shown(unexpected)}")
    if mismatched:
        problems.append(f"size-mismatched keys: {', '.join(mismatched[:_SHOWN])}")
    if problems:
        raise CheckpointMismatchError(f"{what}: " + "; ".join(problems) + ".")


def expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Parameter and persistent-buffer shapes of a module built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        module = build()
    return {key: value.shape for key, value in module.state_dict().items()}


def refuse_output_over_input(destination: Path, *inputs) -> None:
    """Writing the destination replaces the whole folder: it must not be, or hold, one of the inputs."""
    target = destination.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise InputError(
                f"the destination {destination} is (or contains) the input {given}, which converting would "
                "delete; choose another output folder."
            )


def save_atomically(destination: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """`write(folder)` into a temporary sibling of `destination`, then rename it into place."""
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists: choose another output folder or pass --overwrite.")
    atomic_write_folder(destination, write)
