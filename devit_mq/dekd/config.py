"""The training configuration: typed sections loaded from YAML with errors that name the key path.

Everything that changes a result lives here, so the bundle can record the exact config it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import AugmentConfig
from ..model import ConfigError, ViTConfig
from ..model.config import PRESETS
from ..yamlio import DuplicateKeyError, load_strict
from .distributed import DEVICES

# The feature codecs (devit_mq.protocol.FEATURE_CODECS) that fusion training simulates per batch.
CODECS = ("fp32", "fp16", "int8")
FINETUNE_MODES = ("joint", "frozen")
NORMALIZE = ("dataset", "imagenet", "inception")


@dataclass(frozen=True)
class DataSection:
    source: str = "mnist5k"
    seed: int = 0
    test_size: int | float = 1000
    root: str | None = None
    image_size: int | None = None
    max_train: int | None = None
    max_test: int | None = None
    val_size: int | float = 0   # validation images carved (stratified, seeded) from the training data
    # input normalisation: the training images' own mean/std, or the constants a checkpoint was
    # trained with (imagenet: timm's DeiT/ViT-augreg-in1k mean/std; inception: 0.5/0.5)
    normalize: str = "dataset"

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"data.normalize must be one of {NORMALIZE}, got {self.normalize!r}")

    def loader_args(self) -> dict[str, Any]:
        """The keyword arguments of ``load_dataset`` (everything but the normalisation)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "normalize"}


@dataclass(frozen=True)
class TrainSection:
    """One stage's optimisation: AdamW, linear warm-up then cosine decay to ``min_lr``."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # > 0: score on the validation split every this many epochs (and after the last) and keep the
    # best-scoring weights (epoch choice on validation data); 0: keep the last epoch's weights
    val_every: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0 or self.warmup_epochs < 0:
            raise ConfigError("train: epochs >= 0, batch_size > 0, lr > 0 and warmup_epochs >= 0 are required")
        if self.val_every < 0:
            raise ConfigError(f"train.val_every must be >= 0, got {self.val_every}")


@dataclass(frozen=True)
class GroupsSection:
    num_groups: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ConfigError(f"groups.num_groups must be >= 1, got {self.num_groups}")


@dataclass(frozen=True)
class TeacherSection:
    model: dict[str, Any] = field(default_factory=dict)   # ViTConfig fields; data shape filled in
    checkpoint: str | None = None                           # local timm-format weights (strict keys)
    reset_head: bool = False    # a checkpoint's classifier of another class count is re-initialised
    train: TrainSection = field(default_factory=TrainSection)


@dataclass(frozen=True)
class BalanceSection:
    """Size each sub-model for its edge's device (:mod:`devit_mq.profile.balance`): one profile per
    group (part ``i`` runs on the device of ``profiles[i]``); each part's width and depth are chosen
    from ``widths`` x ``depths`` so that the largest predicted edge latency is smallest while the
    parts keep ``budget_macs`` in total (0: what ``models`` computes together, the equal split's)."""

    profiles: list[str] = field(default_factory=list)  # empty: off
    widths: list[int] = field(default_factory=lambda: [16, 24, 32, 48, 64, 80, 96, 112, 128])
    depths: list[int] = field(default_factory=list)    # empty: each model's own depth
    budget_macs: int = 0

    def __post_init__(self) -> None:
        if any(w <= 0 for w in self.widths) or any(d <= 0 for d in self.depths) or self.budget_macs < 0:
            raise ConfigError("students.balance: widths and depths must be positive, budget_macs >= 0")


@dataclass(frozen=True)
class StudentsSection:
    models: list[dict[str, Any]] = field(default_factory=list)  # one per group, or one for all
    relation_weight: float = 1.0               # 1.0 = the paper's objective; 0 = no feature matching
    relation_weights: list[float] = field(default_factory=lambda: [0.2, 0.1, 0.3])  # Q, K, V (paper's)
    relation_block: int | None = None          # student block; None = floor(L/2) - 1, as the paper's code
    teacher_relation_block: int | None = None  # teacher block; None = floor(L/2) - 1
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    # > 0: the paper's stage 1, a teacher copy fine-tuned per class group (at group_teacher_lr, its
    # epochs chosen on validation with train.val_every) teaches that group's sub-model
    group_teacher_epochs: int = 0
    group_teacher_lr: float = 1.0e-4
    balance: BalanceSection = field(default_factory=BalanceSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        if len(self.relation_weights) != 3:
            raise ConfigError(f"students.relation_weights needs 3 values (Q, K, V), got {self.relation_weights}")


@dataclass(frozen=True)
class FusionSection:
    finetune: str = "joint"             # joint: students fine-tuned with the head; frozen: head only
    student_lr_scale: float = 0.1       # students' lr relative to the head's when joint
    feature_dropout: float = 0.2        # probability that a sample loses one whole sub-model
    # Supervise a sample whose own class's sub-model was dropped? True (plain feature dropout) teaches
    # the others to guess those classes; false keeps the fusion sharp on the classes still present.
    orphan_loss: bool = True
    codecs: list[str] = field(default_factory=lambda: list(CODECS))  # simulated per batch
    mse_weight: float = 1.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    train: TrainSection = field(default_factory=TrainSection)
    # Candidate settings, each overriding some of the fields above (not train): every candidate is
    # trained and the one that ships is chosen on the validation split (devit_mq.dekd.select).
    # Empty: the settings above are the only candidate.
    variants: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, variant in enumerate(self.variants):
            bad = sorted(set(variant) - set(VARIANT_KEYS))
            if bad:
                raise ConfigError(f"variants[{i}]: unknown key(s) {bad}; a variant may set {list(VARIANT_KEYS)}")
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"fusion.finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        bad = [c for c in self.codecs if c not in CODECS]
        if bad or not self.codecs:
            raise ConfigError(f"fusion.codecs must be a non-empty list from {CODECS}, got {self.codecs}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ConfigError(f"fusion.feature_dropout must be in [0, 1), got {self.feature_dropout}")


    def candidates(self) -> list[FusionSection]:
        """The settings to train, in order: each variant applied to this section (or this section)."""
        base = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("variants", "train")}
        return [dataclasses.replace(build(FusionSection, {k: base[k] for k in VARIANT_KEYS} | dict(v),
                                          f"fusion.variants[{i}]"), train=self.train)
                for i, v in enumerate(self.variants)] or [self]


# what a fusion variant may change (everything but the optimisation schedule)
VARIANT_KEYS = ("finetune", "student_lr_scale", "feature_dropout", "orphan_loss", "codecs", "mse_weight",
                "ce_weight", "kd_weight")


@dataclass(frozen=True)
class AblationSection:
    # re-run students + fusion without the relation loss, same budget, once per seed (students' and
    # fusion's seeds; the teacher is shared). Seed 0 is the shipped run itself.
    enabled: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    # with students.group_teacher_epochs > 0: also train students + fusion from the shared teacher
    group_teachers: bool = False

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"ablation.seeds must be distinct non-negative integers, got {self.seeds}")


@dataclass(frozen=True)
class OutputSection:
    bundle: str = "runs/bundle"
    work_dir: str | None = None   # stage checkpoints; default: "<bundle>.work"
    storage_dtype: str = "float16"
    ship_teacher: bool = True


@dataclass(frozen=True)
class DEKDConfig:
    name: str = "dekd"
    seed: int = 0
    threads: int = 2
    device: str = "auto"   # auto | cpu | cuda (auto: the GPU when torch sees one)
    amp: bool = True       # float16 mixed precision on CUDA (never on the CPU)
    data: DataSection = field(default_factory=DataSection)
    groups: GroupsSection = field(default_factory=GroupsSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    students: StudentsSection = field(default_factory=StudentsSection)
    fusion: FusionSection = field(default_factory=FusionSection)
    ablation: AblationSection = field(default_factory=AblationSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> DEKDConfig:
        return dataclasses.replace(self, **changes)

    def teacher_config(self, image_shape: tuple[int, int, int], num_classes: int) -> ViTConfig:
        return _model_config(self.teacher.model, image_shape, num_classes, "teacher.model")

    def student_configs(self, image_shape: tuple[int, int, int], groups: list[list[int]]) -> list[ViTConfig]:
        models = self.students.models or [{}]
        if len(models) == 1:
            models = models * len(groups)
        if len(models) != len(groups):
            raise ConfigError(f"students.models: {len(models)} models for {len(groups)} groups (give 1 or "
                              f"{len(groups)})")
        return [_model_config(m, image_shape, len(g), f"students.models[{i}]")
                for i, (m, g) in enumerate(zip(models, groups, strict=True))]


def _model_config(data: dict[str, Any], image_shape: tuple[int, int, int], num_classes: int,
                  where: str) -> ViTConfig:
    """ViTConfig from a YAML mapping; input size, channels and classes come from the data."""
    h, w, c = image_shape
    if h != w:
        raise ConfigError(f"{where}: images must be square, data has {h}x{w}")
    fixed = {"img_size": h, "in_chans": c, "num_classes": num_classes}
    clash = {k: data[k] for k in fixed if k in data and data[k] != fixed[k]}
    if clash:
        raise ConfigError(f"{where}: {clash} contradicts the data ({fixed})")
    data = dict(data)
    if "preset" in data:  # a timm shape by name, e.g. deit_base_distilled_patch16_224, then overrides
        name = data.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"{where}.preset: unknown {name!r}; known: {sorted(PRESETS)}")
        base = PRESETS[name].to_dict()
        clash = {k: base[k] for k in ("img_size", "in_chans") if base[k] != fixed[k]}
        if clash:
            raise ConfigError(f"{where}.preset {name} expects {clash}; the data gives {fixed} "
                              "(set data.image_size, or use RGB images)")
        data = {**base, **data}
    return ViTConfig.from_dict({**data, **fixed}, where)


# -- generic typed loading -------------------------------------------------------------------------
_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true/false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp in _SCALARS:
        accepted, what = _SCALARS[tp]
        # bool is an int subclass: `true` must not pass for a number
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{where}: expected {what}, got {value!r}")
        return float(value) if tp is float else value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking unknown keys and each field's type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        path = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config key(s) {path}; known keys here: {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def config_from_dict(data: Any) -> DEKDConfig:
    cfg = build(DEKDConfig, data, "")
    cfg.fusion.candidates()  # a bad variant fails at load time, naming its key
    return cfg


def load_config(path: str | Path) -> DEKDConfig:
    """Read and validate a YAML training config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = load_strict(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: line {exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    data = {} if data is None else data
    if isinstance(data, dict) and "name" not in data:
        data = {**data, "name": path.stem}
    return config_from_dict(data)
