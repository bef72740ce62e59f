"""Class lists of label stores, checkpoints and predictions: defaults, and one merge used by train and evaluate.

A class list names label ids 0..n-1 by position. Ingest names every id up to a
store's highest one, ``class_<id>`` where it knows no real name
(:func:`default_class_name`). Such a default says nothing about the class, so it
agrees with any name for that id; two lists agree when every id they share is a
default in one of them or has the same real name in both.
:func:`merge_class_names` joins lists that agree into one covering the highest id
of any of them, real names winning over defaults, and refuses a real conflict
(two real names for one id, or one name for two ids), naming the ids and the stores.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence

from tilefuse.errors import InputError, clipped

IGNORE = 255
"""The label value meaning "no class": unlabelled (scene stores), no prediction (prediction stores, GeoTIFF
nodata), and the index losses and metrics skip. Its one name; ``tilefuse.scene.IGNORE`` is the same object."""


def default_class_name(class_id: int) -> str:
    """The name ingest gives a label id it knows no name for."""
    return f"class_{class_id}"


def is_default_name(name: str, class_id: int) -> bool:
    """Whether ``name`` is a default for ``class_id`` (``class_<id>``, or ``class <id>`` as older predictions wrote it)."""
    return name in (f"class_{class_id}", f"class {class_id}")


def class_names_problem(names) -> str | None:
    """What is wrong with ``names`` as a class list (None if nothing): not a list of strings, more than 255 names,
    an empty name, or one name for two ids (metrics are keyed by name, so evaluate dropped one of two classes named alike)."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return f"must be a list of strings, got {clipped(repr(names))}"
    if len(names) > IGNORE:  # ids are 0..254: 255 means ignore, so a 256th name made ignored pixels a class
        return f"name {len(names)} classes, more than {IGNORE} (ids 0..{IGNORE - 1}; {IGNORE} means ignore)"
    if any(not n.strip() for n in names):
        return f"leave class {next(k for k, n in enumerate(names) if not n.strip())} without a name (an empty string)"
    twice = next((n for k, n in enumerate(names) if n in names[:k]), None)
    if twice is not None:
        return f"give classes {names.index(twice)} and {names.index(twice, names.index(twice) + 1)} the same name {twice!r}"
    return None


def class_name_list(value) -> list[str] | None:
    """``class_names=`` as the list of names by id it means: a dict ``{id: name}`` as that list, ids it leaves out
    named ``class_<id>`` as ingest names them (its keys were taken as the names: 'must be a list of strings, got
    [0, 1, 2]'); a list, tuple or other sequence as a list (its names are checked where the store is written);
    a set (no order), or a dict of other keys or values, is refused, quoting it."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    if isinstance(value, Mapping):
        whole = all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and 0 <= k < IGNORE for k in value)
        if not (whole and all(isinstance(n, str) for n in value.values())):
            raise InputError(
                f"class_names= as a dict must map whole-number class ids 0..{IGNORE - 1} to names, got {clipped(repr(value))}: "
                "pass e.g. {0: 'water', 1: 'forest'} or ['water', 'forest']"
            )
        named = {int(k): n for k, n in value.items()}
        return [named.get(k, default_class_name(k)) for k in range(max(named, default=-1) + 1)]
    if isinstance(value, (set, frozenset)) or not hasattr(value, "__iter__"):
        raise InputError(
            f"class_names= must be a list of names, one per class id from 0 (or a dict {{id: name}}), "
            f"got {type(value).__name__} {clipped(repr(value))}"
        )
    return list(value)


def store_class_names(ds) -> list[str]:
    """Class list of a scene store's ``label``: its ``class_names``, extended with defaults up to its highest id.

    The highest id comes from the ``class_counts`` ingest records; a store without
    them (written by another tool) is scanned once.
    """
    label = ds["label"]
    names = [str(n) for n in (label.attrs.get("class_names") or [])]
    counts = label.attrs.get("class_counts")
    if counts is not None:
        highest = max((k for k, c in enumerate(counts) if c), default=-1)
    else:
        highest = int(label.where(label != IGNORE).max().compute().fillna(-1))
    return names + [default_class_name(k) for k in range(len(names), highest + 1)]


def merge_class_names(
    lists: Sequence[tuple[str, Sequence[str]]], fix: str = "ingest these stores with the same --class-names"
) -> list[str]:
    """One class list for ``(source, class list)`` pairs that agree (module docstring); InputError on a conflict.

    The result covers the longest list; each id takes the real name any list gives
    it, else its default. ``fix`` ends the error message of two names for one id; a
    result that gives one name to two ids (``water, trees`` and ``class_0, class_1,
    trees``) is refused too, naming both ids, the stores and the remap.
    """
    merged: list[str] = []
    named: dict[int, tuple[str, str]] = {}  # id -> (real name, first source naming it)
    conflicts: list[str] = []
    for source, names in lists:
        for k, name in enumerate(names):
            if k == len(merged):
                merged.append(default_class_name(k))
            if is_default_name(name, k):
                continue
            if k not in named:
                named[k] = (name, source)
                merged[k] = name
            elif named[k][0] != name:
                conflicts.append(f"class {k} is {named[k][0]!r} in {named[k][1]} but {name!r} in {source}")
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise InputError(f"class lists conflict: {conflicts[0]}{more}: {fix}")
    twice = next((n for k, n in enumerate(merged) if n in merged[:k]), None)
    if twice is not None:  # the model would learn one class as two, and metrics (keyed by name) merge them
        first, second = merged.index(twice), merged.index(twice, merged.index(twice) + 1)
        where = [f"in {named[k][1]}" if k in named else "by default (no store names it)" for k in (first, second)]
        raise InputError(
            f"class lists give the name {twice!r} to two ids, class {first} {where[0]} and class {second} {where[1]}, "
            f"so a model would learn {twice!r} as two classes: re-ingest one store with its ids remapped by --label-map "
            f"(Python label_map=) so that {twice!r} has one id in every store, or rename it in one of them (--class-names)"
        )
    return merged
