"""Typed, frozen configuration loaded from ``config.yaml``.

Config flows one way: YAML file -> :class:`Config` (a tree of frozen dataclasses) -> passed down.
CLI flags override single values with ``--set section.key=value`` (repeatable) and ``--config PATH``
chooses another file. An unknown key is an error with a "did you mean" hint; a value of the wrong
type names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.errors import AppError
from app.resources import config_file, weights_file

DEFAULT_CONFIG_PATH = config_file()  # the shipped config.yaml, whatever the current directory


class ConfigError(AppError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad syntax, out of range)."""


def _at_least(key: str, value: float, minimum: float, meaning: str = "") -> None:
    if value < minimum:
        hint = f" ({meaning})" if meaning else ""
        raise ConfigError(f"{key} must be >= {minimum:g}{hint}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key} must be one of {', '.join(valid)}, got '{value}'")


@dataclass(frozen=True)
class SourceConfig:
    uri: str = "synthetic"
    fps: float = 25.0
    loop: bool = False
    prefetch_threads: int = 4
    prefetch_depth: int = 16
    strict: bool = False
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    reconnect_attempts: int = 5
    reconnect_backoff_s: float = 0.5


@dataclass(frozen=True)
class SynthConfig:
    """The ``synth`` section: both generators' settings (the classic one first, then the propagated
    generator's and the randomisation ranges); documented key by key in config.yaml."""

    size: int = 512
    frames: int = 64
    seed: int = 0
    fringe_period_px: float = 4.0
    fringe_angle_deg: float = 45.0
    num_cells: int = 8
    cell_radius_px: tuple[float, float] = (0.06, 0.12)
    max_phase_rad: float = 3.0
    drift_px_per_frame: float = 1.5
    num_divisions: int = 0
    # debris, dust, noise and the camera
    num_particles: int = 6
    num_dust_rings: int = 3
    noise_std: float = 0.02
    defocus_sigma_px: float = 0.6
    bit_depth: int = 8
    ignore_border_px: int = 0
    fringe_visibility: float = 0.85
    illumination_sigma: float = 0.6
    aberration_rad: float = 1.5
    defocus_halo: float = 3.0
    # which generator, and the propagated generator's optics (app/synthesis/propagated.py)
    generator: str = "classic"
    randomize: bool = False
    fringe_period_range_px: tuple[float, float] = (2.2, 10.0)
    defocus_range_px: tuple[float, float] = (3.0, 40.0)
    wavelength_px: float = 3.0
    defocus_px: float = 0.0
    pupil_fraction: float = 0.33
    object_radius_px: tuple[float, float] = (12.0, 40.0)
    # object mix, coherent noise and parasitic fringes
    bead_fraction: float = 0.2
    organism_fraction: float = 0.1
    cluster_fraction: float = 0.2
    speckle_rad: float = 0.1
    speckle_grain_px: float = 3.0
    parasitic_fringes: int = 1
    parasitic_strength: float = 0.05
    dust_strength: float = 0.15
    keep: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreprocessRecipe:
    """The preprocessing a model is trained with, recorded in its checkpoint and replayed at inference.

    Its fields are the one list that drives the ``preprocess`` config section (:class:`PreprocessConfig`
    extends it), the run-time settings (:class:`app.pipeline.preprocess.PreprocessSettings` extends it),
    the checkpoint recipe (:func:`app.pipeline.preprocess.recipe`) and training.
    """

    clahe: bool = False
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    background: str = "none"
    background_frames: int = 10
    background_alpha: float = 0.05
    hologram: str = "none"  # none | offaxis: demodulate off-axis holograms into field channels
    hologram_filter: str = "smooth_disk"
    hologram_filter_size: float = 0.5
    hologram_background_fit: bool = True  # remove the residual tilt/curvature after the background division


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(PreprocessRecipe))


@dataclass(frozen=True)
class PreprocessConfig(PreprocessRecipe):
    """The ``preprocess`` section: the recipe plus run-time choices that are never recorded."""

    from_checkpoint: bool = True
    input_size: int = 0
    hologram_carrier: tuple[float, ...] = ()  # (period_px, angle_deg); empty = found from the data
    background_file: str = ""  # background hologram (run-time input, not part of the recipe)
    hologram_backend: str = "auto"  # numpy | torch | auto (torch when the model runs on CUDA)

    def __post_init__(self) -> None:
        _at_least("preprocess.input_size", self.input_size, 0, "0 = native resolution")
        _positive("preprocess.clahe_clip_limit", self.clahe_clip_limit)
        _at_least("preprocess.clahe_tile_grid", self.clahe_tile_grid, 1)
        _at_least("preprocess.background_frames", self.background_frames, 1)
        if not 0.0 < self.background_alpha <= 1.0:
            raise ConfigError(f"preprocess.background_alpha must be in (0, 1], got {self.background_alpha}")


@dataclass(frozen=True)
class ModelConfig:
    weights: str = "weights/icnet_interferogram.pt"
    backend: str = "torch"
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    trace: bool = True
    onnx_path: str = ""
    threads: int = 0
    warmup_iters: int = 2

    def __post_init__(self) -> None:
        # "weights/NAME.pt" names the shipped weights from any directory (app.resources.weights_file)
        object.__setattr__(self, "weights", str(weights_file(self.weights)) if self.weights else self.weights)
        _one_of("model.precision", self.precision, ("fp32", "fp16", "bf16"))
        _at_least("model.threads", self.threads, 0, "0 = automatic")
        _at_least("model.warmup_iters", self.warmup_iters, 0)


@dataclass(frozen=True)
class PipelineConfig:
    queue_size: int = 8
    batch_size: int = 1
    batch_timeout_ms: float = 5.0
    join_timeout_s: float = 5.0
    max_frames: int = 0
    pin_threads: bool = True

    def __post_init__(self) -> None:
        _at_least("pipeline.queue_size", self.queue_size, 1)
        _at_least("pipeline.batch_size", self.batch_size, 1)
        _at_least("pipeline.batch_timeout_ms", self.batch_timeout_ms, 0)
        _positive("pipeline.join_timeout_s", self.join_timeout_s)
        _at_least("pipeline.max_frames", self.max_frames, 0, "0 = no limit")


@dataclass(frozen=True)
class OverlayConfig:
    alpha: float = 0.5
    contours: bool = True
    contour_thickness: int = 1
    hud: bool = True
    base: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"overlay.alpha must be between 0 and 1, got {self.alpha}")
        _at_least("overlay.contour_thickness", self.contour_thickness, 1)
        _one_of("overlay.base", self.base, ("auto", "frame"))


@dataclass(frozen=True)
class OutputConfig:
    display: bool = True
    video: str = ""
    gif: str = ""
    masks_dir: str = ""
    csv: str = ""
    objects: str = ""
    tracks: str = ""
    events: str = ""
    plots_dir: str = ""
    stats_json: str = ""
    video_fps: float = 25.0
    gif_stride: int = 2
    gif_scale: float = 0.5
    gif_max_frames: int = 120
    gif_fps: float = 12.0


@dataclass(frozen=True)
class PreviewConfig:
    """The browser preview (``app.live --serve``): where it listens, how often viewers get a frame, and
    where its record button writes MP4 files."""

    address: str = ""  # [HOST:]PORT; "" = off
    public: bool = False  # allow an address other machines can reach (0.0.0.0, a LAN address)
    max_fps: float = 15.0
    jpeg_quality: int = 80
    send_timeout_s: float = 2.0
    max_viewers: int = 8
    record_dir: str = "recordings"

    def __post_init__(self) -> None:
        _positive("preview.max_fps", self.max_fps)
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"preview.jpeg_quality must be between 1 and 100, got {self.jpeg_quality}")
        _positive("preview.send_timeout_s", self.send_timeout_s)
        _at_least("preview.max_viewers", self.max_viewers, 1)


@dataclass(frozen=True)
class OpticsConfig:
    """The microscope, for physical read-outs: µm per camera pixel in the object plane, the laser
    wavelength, the refractive index difference between cells and medium (thickness), and the specific
    refraction increment α (dry mass = ∫ OPD dA / α; 1 mL/g = 1 µm³/pg). ``pixel_size_from_file``:
    a TIFF/OME stack that states its pixel size (0.01-50 µm) overrides ``pixel_size_um``.
    ``phase_sign``: ±1 multiplies the demodulated phase so that cells are positive on this microscope;
    0 chooses it per run from the first objects seen."""

    pixel_size_um: float = 0.5
    wavelength_nm: float = 633.0
    refractive_index_difference: float = 0.03
    refraction_increment_ml_per_g: float = 0.19
    pixel_size_from_file: bool = True
    phase_sign: int = 0

    def __post_init__(self) -> None:
        if self.phase_sign not in (-1, 0, 1) or isinstance(self.phase_sign, bool):
            raise ConfigError(f"optics.phase_sign must be 1, -1 or 0 (auto), got {self.phase_sign!r}")
        if not isinstance(self.pixel_size_from_file, bool):
            raise ConfigError(f"optics.pixel_size_from_file must be true or false, got {self.pixel_size_from_file!r}")
        for key in ("pixel_size_um", "wavelength_nm", "refractive_index_difference", "refraction_increment_ml_per_g"):
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ConfigError(f"optics.{key} must be a number > 0, got {value!r}")

    @property
    def pixel_area_um2(self) -> float:
        return self.pixel_size_um**2

    @property
    def opd_um_per_rad(self) -> float:
        """Optical path difference of one radian of phase, λ/2π (µm)."""
        return self.wavelength_nm * 1e-3 / (2.0 * math.pi)


@dataclass(frozen=True)
class ObjectsConfig:
    """Objects per frame (connected components of the label map) and their tracking across frames."""

    min_area_px: int = 20
    max_link_distance_px: float = 30.0
    max_gap_frames: int = 3
    trail_frames: int = 12
    mass_margin_px: int = 4
    background_ring_px: int = 6
    division_confirm_frames: int = 3
    max_daughter_area_ratio: float = 2.0
    max_hidden_frames: int = 60

    def __post_init__(self) -> None:
        _at_least("objects.min_area_px", self.min_area_px, 1)
        _at_least("objects.mass_margin_px", self.mass_margin_px, 0)
        _at_least("objects.background_ring_px", self.background_ring_px, 0, "0 = no local background")
        _at_least("objects.division_confirm_frames", self.division_confirm_frames, 1)
        _at_least("objects.max_daughter_area_ratio", self.max_daughter_area_ratio, 1)
        _positive("objects.max_link_distance_px", self.max_link_distance_px)
        _at_least("objects.max_gap_frames", self.max_gap_frames, 0)
        _at_least("objects.max_hidden_frames", self.max_hidden_frames, self.max_gap_frames, "at least max_gap_frames")
        _at_least("objects.trail_frames", self.trail_frames, 0, "0 = no trails")


@dataclass(frozen=True)
class BatchConfig:
    """``python -m app.batch`` on Ray Data: the cluster to join and the shape of the actor pool."""

    address: str = ""
    actors: int = 0
    cpus_per_actor: float = 1.0
    cpus_per_reader: float = 0.5
    frames_per_block: int = 8

    def __post_init__(self) -> None:
        _at_least("batch.actors", self.actors, 0, "0 = automatic")
        _positive("batch.cpus_per_actor", self.cpus_per_actor)
        _positive("batch.cpus_per_reader", self.cpus_per_reader)
        _at_least("batch.frames_per_block", self.frames_per_block, 1)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "icnet"  # registered model name
    backbone: str = "resnet18"  # backbone for ICNet / ResNet FCNs
    width: float = 0.5  # ICNet channel multiplier
    backbone_weights: str = ""  # torchvision ImageNet state_dict file loaded into the backbone ("" = none)
    in_channels: int = 1  # 1 = grayscale, 3 = RGB
    num_classes: int = 2
    class_names: tuple[str, ...] = ("background", "cell")
    epochs: int = 10
    steps_per_epoch: int = 0  # batches per epoch; 0 = one pass over the training set
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0
    scheduler: str = "onecycle"  # onecycle | poly | none
    poly_power: float = 0.9  # poly schedule: lr * (1 - step / total) ** power
    loss: str = "ce"  # ce | asl | dice | ce+dice
    class_weights: tuple[float, ...] = ()  # cross-entropy weight per class; empty = equal
    asl_gamma_pos: float = 0.0  # asymmetric loss focusing of positives
    asl_gamma_neg: float = 4.0  # asymmetric loss focusing of negatives
    asl_clip: float = 0.05  # asymmetric loss probability margin
    asl_activation: str = "softmax"  # softmax | sigmoid
    aux_weights: tuple[float, float, float] = (0.4, 0.4, 1.0)  # ICNet 1/16, 1/8, 1/4 loss weights
    patience: int = 5  # early stopping: epochs without val mIoU improvement; 0 = never stop early
    num_workers: int = 0  # DataLoader worker processes
    seed: int = 0  # model init, data order and augmentation
    split: str = "file"  # file | sequence (subfolder or filename prefix)
    val_fraction: float = 0.2  # fraction of files or sequences held out for validation
    max_val_frames: int = 16  # validation frames per epoch (evenly spaced); 0 = all
    augment_crop: bool = True  # random crops of crop_size
    crop_size: tuple[int, int] = (256, 256)  # training crop H, W in pixels (native resolution)
    augment_flip: bool = True  # random horizontal and vertical flips
    clahe: bool = False  # CLAHE (preprocess.clahe_clip_limit / clahe_tile_grid), recorded in the checkpoint
    background: str = "none"  # none | first_n_mean (preprocess.background_frames), recorded in the checkpoint
    standardize: bool = True  # per-image standardisation (zero mean, unit variance)
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    synthetic_seed: int = 1000  # first synthetic training sequence seed; the following ones are used too
    synthetic_sequences: int = 8  # synthetic training sequences (seeds synthetic_seed + i)
    synthetic_val_sequences: int = 1  # synthetic validation sequences (the seeds after the training ones)
    synthetic_endless: bool = False  # fresh training sequences every epoch (an endless seeded stream)
    hologram: str = "none"  # none | offaxis: train on demodulated field channels (recorded in the checkpoint)
    hologram_background_fraction: float = 0.5  # share of sequences demodulated with their background hologram
    phase_sign_flip: bool = True  # hologram: random phase sign (the sideband sign differs between microscopes)
    contact_px: int = 0  # synthetic: object pixels this close to another object become the last class, "contact"
    init_weights: str = ""  # a checkpoint of this project to start from (new classes start as the last old one)


@dataclass(frozen=True)
class BenchmarkConfig:
    repeats: int = 5
    warmup: int = 2
    frames: int = 64
    sizes: tuple[int, ...] = (512, 1024)
    reader_threads: tuple[int, ...] = (1, 2, 4, 8)
    hdd_latency_ms: float = 8.0
    hdd_bandwidth_mb_s: float = 150.0
    sata_ssd_latency_ms: float = 0.1
    sata_ssd_bandwidth_mb_s: float = 500.0
    nvme_latency_ms: float = 0.02
    nvme_bandwidth_mb_s: float = 3000.0
    hdd_queue_depth: int = 1
    sata_ssd_queue_depth: int = 32
    nvme_queue_depth: int = 64
    profiles: tuple[str, ...] = ("hdd", "sata_ssd", "nvme")
    storage_size: int = 1024
    storage_formats: tuple[str, ...] = ("png", "jpg", "tiff", "npy")
    large_input_size: int = 3072
    inference_frames: int = 16
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    backends: tuple[str, ...] = ("torch", "onnx")
    model_size: int = 512
    gflops_size: int = 1024
    models: tuple[str, ...] = ()
    model_budget_s: float = 20.0
    onnx_max_params_m: float = 0.0
    end_to_end_size: int = 512
    one_core_size: int = 1024
    gap_reference_fps: float = 23.0
    hologram_sizes: tuple[int, ...] = (1024, 2048)


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    optics: OpticsConfig = field(default_factory=OpticsConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    objects: ObjectsConfig = field(default_factory=ObjectsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def _type_name(tp: Any) -> str:
    """``int``, ``tuple[float, float]``, ``int | None``: the annotation as a user reads it."""
    if typing.get_args(tp):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponent forms without a dot ("1e-4") as strings.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        # YAML reads a bare number such as the camera index in ``uri: 0`` as an int; keep its text.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, valid, n=1)
    suggestion = f"; did you mean '{where}{hint[0]}'?" if hint else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{where}{key}'{suggestion}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` into (["section", "key"], value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override '{text}' must name a section and a key, e.g. model.backend=onnx")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse value: {exc}") from None
    return path, value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load ``path`` (default: the shipped config.yaml, :mod:`app.resources`) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if path is not None or cfg_path.exists():
        if not cfg_path.is_file():
            raise ConfigError(f"config file not found: {cfg_path}")
        try:
            loaded = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cfg_path}: invalid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{cfg_path}: top level must be a mapping of sections")
        data = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    return _build(Config, data, "")


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """Return a copy of ``config`` with some fields of some sections changed (type-checked).

    Example: ``replace(cfg, output={"gif": "out.gif"}, pipeline={"max_frames": 10})``.
    """
    changed = {}
    for name, values in sections.items():
        if name not in {f.name for f in dataclasses.fields(Config)}:
            raise _unknown_key(name, [f.name for f in dataclasses.fields(Config)], "")
        section = getattr(config, name)
        current = dataclasses.asdict(section)
        current.update(values)
        changed[name] = _build(type(section), current, f"{name}.")
    return dataclasses.replace(config, **changed)
