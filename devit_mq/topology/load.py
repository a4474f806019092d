"""Reading a topology: YAML file (or mapping) -> validated :class:`Topology`, checked against its bundle."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from devit_mq.protocol import MANIFEST_FILE, MAX_CLASS_NAME, MAX_CLASSES
from devit_mq.yamlio import DuplicateKeyError, load_strict

from .schema import Topology, TopologyError, parse_topology

if TYPE_CHECKING:  # the model package imports torch: only load it when a manifest is really read
    from devit_mq.model import Manifest

PACKAGE_BUNDLES = Path(__file__).resolve().parent.parent / "assets" / "bundles"


def _is_plain_name(value: str) -> bool:
    return "/" not in value and "\\" not in value and not value.startswith((".", "~"))


def bundle_candidates(value: str, base_dir: Path) -> list[Path]:
    """Where ``bundle: value`` may live, in the order tried: the path (relative to the topology's
    folder), then, for a plain name, the package's shipped bundles."""
    path = Path(value).expanduser()
    candidates = [path if path.is_absolute() else base_dir / path]
    if _is_plain_name(value):
        candidates.append(PACKAGE_BUNDLES / value)
    return candidates


def resolve_bundle(value: str, base_dir: Path) -> Path:
    """The first candidate that holds a manifest; if none does, the most likely intended one (the
    shipped bundle for a plain name, else the path), so the error can name it."""
    candidates = bundle_candidates(value, base_dir)
    for candidate in candidates:
        if (candidate / MANIFEST_FILE).is_file():
            return candidate.resolve()
    return candidates[-1].resolve()


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file strictly (no duplicate keys); errors become :class:`TopologyError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TopologyError([("", f"topology file {path} does not exist")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError([("", f"cannot read topology file {path}: {exc}")]) from exc
    try:
        return load_strict(text)
    except DuplicateKeyError as exc:
        raise TopologyError([(f"line {exc.line}", str(exc))], path) from None
    except yaml.YAMLError as exc:
        raise TopologyError([("", f"not valid YAML: {exc}")], path) from exc


def load_topology(source: str | Path | Mapping[str, Any], *, check_bundle: bool = True,
                  base_dir: str | Path | None = None, bundle: str | Path | None = None,
                  keys_dir: str | Path | None = None) -> Topology:
    """Load and validate a topology from a YAML file or a mapping.

    ``check_bundle`` (default) also requires the bundle to exist and to match the topology
    (:func:`check_against_bundle`); it reads only the bundle's manifest, never weights. Relative
    paths resolve against the YAML file's folder (for a mapping: ``base_dir``, default the current
    directory).

    ``bundle`` and ``keys_dir`` replace the file's ``bundle`` and ``security.keys_dir``: one
    topology file serves hosts that keep the bundle or the keys in different places. A relative
    path given here resolves against the current directory (it was typed there), a bundle name
    that is no path names a shipped bundle as in the file.
    """
    if isinstance(source, Mapping):
        data: Any = dict(source)
        path = None
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(source)
        data = read_yaml(path)
        base = Path(base_dir) if base_dir is not None else path.resolve().parent
    if isinstance(data, dict) and (bundle is not None or keys_dir is not None):
        data = _with_site_paths(data, bundle, keys_dir)
    topology = parse_topology(data, base_dir=base.resolve(), source=path, resolve_bundle=resolve_bundle)
    if check_bundle:
        check_against_bundle(topology, bundle_manifest(topology, data.get("bundle")))
    return topology


def _with_site_paths(data: dict[str, Any], bundle: str | Path | None, keys_dir: str | Path | None) -> dict[str, Any]:
    data = dict(data)
    if bundle is not None:
        data["bundle"] = str(Path(bundle).resolve()) if Path(bundle).exists() else str(bundle)
    if keys_dir is not None:
        security = data.get("security")
        data["security"] = {**(security if isinstance(security, dict) else {}), "keys_dir": str(Path(keys_dir).resolve())}
    return data


def bundle_manifest(topology: Topology, value: str | None = None) -> Manifest:
    """Read the topology's bundle manifest (not weights); a missing or broken bundle is a
    :class:`TopologyError` at ``bundle``. ``value`` is the YAML's spelling, for the message."""
    directory = topology.bundle
    if not (directory / MANIFEST_FILE).is_file():
        if value is not None and topology.source is not None:
            tried = bundle_candidates(value, topology.source.resolve().parent)
        else:
            tried = [directory]
        where = " or ".join(str(p) for p in tried)
        raise TopologyError([("bundle", f"bundle {value or str(directory)!r} not found: no {MANIFEST_FILE} in "
                              f"{where}")], topology.source)
    from devit_mq.model import BundleError, load_manifest

    try:
        return load_manifest(directory)
    except BundleError as exc:
        raise TopologyError([("bundle", f"bundle at {directory} is unusable: {exc}")], topology.source) from exc


def _profile_problem(path: str, part: int, manifest: Manifest, speed: float = 1.0) -> str | None:
    """Why an edge's device profile does not fit the sub-model it runs (None: it fits): measured for
    other inputs or at another emulated speed, or another device than the one a balanced bundle
    sized this sub-model for."""
    from devit_mq.profile.device import ProfileError, load_profile

    profile = load_profile(path)  # readable: the schema checked it
    try:
        profile.predict_ms(manifest.submodels[part])
    except ProfileError as exc:
        return str(exc)
    if profile.speed != speed:
        return (f"profile {profile.device!r} was measured at speed {profile.speed:g}, but the edge runs at "
                f"speed {speed:g} (set the edge's `speed:` to the profile's, or measure it at this speed)")
    sized = manifest.metadata.get("balance", {}).get("parts", [])
    if part < len(sized) and sized[part].get("device") != profile.device:
        return (f"device {profile.device!r}, but the bundle sized sub-model {part} for device "
                f"{sized[part].get('device')!r} (run it on that device, or retrain with this profile)")
    return None


def check_against_bundle(topology: Topology, manifest: Manifest) -> None:
    """The topology must run every sub-model of the bundle exactly once (N edges for sub-models
    0..N-1), and an edge's declared ``embed_dim`` must be its sub-model's width."""
    problems: list[tuple[str, str]] = []
    n = manifest.num_parts
    widths = [cfg.embed_dim for cfg in manifest.submodels]
    present = set()
    for edge in topology.edges:
        assert edge.submodel is not None
        present.add(edge.submodel)
        if edge.submodel >= n:
            problems.append((f"{edge.key_path}.submodel", f"sub-model {edge.submodel} does not exist: bundle "
                             f"{topology.bundle} has {n} sub-model(s), 0..{n - 1}"))
        elif edge.embed_dim is not None and edge.embed_dim != widths[edge.submodel]:
            problems.append((f"{edge.key_path}.embed_dim", f"{edge.embed_dim} does not match the bundle: sub-model "
                             f"{edge.submodel} is {widths[edge.submodel]} wide"))
        elif edge.profile is not None:
            problem = _profile_problem(edge.profile, edge.submodel, manifest, edge.speed)
            if problem:
                problems.append((f"{edge.key_path}.profile", problem))
    long_names = [c for c in manifest.classes if len(c) > MAX_CLASS_NAME]
    if len(manifest.classes) > MAX_CLASSES or long_names:
        problems.append(("bundle", f"the bundle's classes do not fit a status reply: {len(manifest.classes)} "
                         f"classes (at most {MAX_CLASSES}), {len(long_names)} name(s) longer than "
                         f"{MAX_CLASS_NAME} characters"))
    missing = sorted(set(range(n)) - present)
    if len(topology.edges) != n or missing:
        detail = f"; no edge runs sub-model(s) {', '.join(map(str, missing))}" if missing else ""
        problems.append(("edges", f"the bundle at {topology.bundle} has N={n} sub-models (widths "
                         f"{', '.join(map(str, widths))}) but the topology has {len(topology.edges)} edge(s){detail}"))
    if problems:
        raise TopologyError(problems, topology.source)
