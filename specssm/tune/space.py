"""The knob space `specssm tune` searches: the knobs of each launch of the step, the families of launches
timed together, and the rules that drop a point before anything is compiled.

A *point* of a family sets every knob of its launches: {"coef": {"HB": 8, ...}, "write": {...},
"no_write": {...}} (the split family). `config_of` turns it into a config override (tuning.overridden's
shape). A *target* is what one search times on: state dtype, rounding, T, W, shape and batch.

Analytic rules (`launch_reason`), each a necessary condition, so no valid point is lost:
  * the point is what runs: the launcher clamps some knobs (tile rows to P and to 8192 elements per tile,
    HB to the largest power of two dividing H/G, the token tile to T, TMA off where the pool's rows are
    not 16-byte aligned, programs per SM to the tiles there are); a point whose knob the launcher would
    change runs as another point and is dropped as its duplicate;
  * the tile divides P or one tile covers it (no partial tile at the end of every head);
  * TMA boxes of at most 256 rows and columns;
  * persistent mains: ctas_per_sm programs fit one SM together (it is what the grid size assumes):
    at most 64 warps; with a register cap, ctas x warps x 32 x maxnreg <= 65536 registers; with TMA, the
    state tile's shared-memory buffer (one per program at least) x ctas_per_sm <= 228 KiB. Pipeline
    stages are not in this bound: Triton 3.6 keeps the persistent loop's state tile in one buffer (sm_90
    compile of the no-write main: 42,024 bytes of shared memory at 2 stages, 42,068 at 4).
The exact shared memory, registers and spills come from an offline sm_90 compile (specssm/tune/offline.py).
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import asdict, dataclass

from specssm.step.tuning import DEFAULT

SM_REGISTERS = 65536
SM_SHARED = 228 * 1024          # per SM; one block may use 227 KiB of it
SM_WARPS = 64
MAX_TILE = 8192                 # state elements per tile (specssm/step/launch.py)
TMA_BOX = 256
STATE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8_e4m3fn": 1, "int16": 2}
# specssm/step/store.py's STATE_KIND by dtype name (no Triton import here); codes >= 3 keep row scales
KIND = {"float32": 0, "bfloat16": 1, "float16": 2, "int8": 3, "float8_e4m3fn": 4, "int16": 5}
DEFAULT_SMS = 132               # H200 / H100 SXM; the GPU run reads the card's


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple
    why: str


@dataclass(frozen=True)
class Target:
    """One tuned case's step: state dtype (torch name), rounding, T, W, shape, batch, SMs of the card."""
    state: str
    rounding: str
    T: int
    W: int
    H: int
    P: int
    N: int
    G: int
    batch: int
    num_sms: int = DEFAULT_SMS

    @property
    def hpg(self) -> int:
        return self.H // self.G

    def label(self) -> str:
        return (f"{self.state} {self.rounding} T{self.T} W{self.W} H{self.H}P{self.P}N{self.N}G{self.G} "
                f"b{self.batch}")

    def as_dict(self) -> dict:
        return asdict(self)


_WARPS = Knob("num_warps", (1, 2, 4, 8), "warps per program")
_MAXNREG = Knob("maxnreg", (None, 96, 128, 168), "register cap per thread (None: the compiler's choice)")
_TMA = Knob("tma", (False, True), "state tile through a TMA descriptor, or pointer loads")
_TN = Knob("TN_MIN", (8, 16), "smallest token tile (the tile is max(TN_MIN, next power of two of T))")
MAIN_KNOBS = (
    Knob("BLOCK_P", (16, 32, 64), "state rows per tile"),
    _WARPS,
    Knob("stages", (1, 2, 3, 4), "software pipelining of the persistent loop over tiles"),
    Knob("ctas_per_sm", (1, 2, 3, 4, 5, 6, 8), "programs per SM in the persistent grid"),
    _TMA,
    _MAXNREG,
    Knob("prefetch", (False, True), "the first tiles' state into L2 before the wait for the coefficients"),
)
KNOBS = {
    "coef": (Knob("HB", (1, 2, 4, 8, 16), "heads per program, within one group"), _WARPS, _MAXNREG),
    "write": MAIN_KNOBS + (Knob("col_split", (1, 2), "the fold in column halves (unscaled states)"),
                           Knob("side_stream", (False, True), "the write main beside the no-write main, on a "
                                "second stream (no PDL chain)")),
    "no_write": MAIN_KNOBS,
    "fused": (Knob("BLOCK_P", (16, 32, 64), "state rows per program"), _WARPS, _MAXNREG, _TN, _TMA),
    # the fused kernel's own write / no-write launches (the replay no-write form), over its BLOCK_P
    "fused.write": (_WARPS, _MAXNREG, _TMA, _TN),
    "fused.no_write": (_WARPS, _MAXNREG, _TMA, _TN),
}


@dataclass(frozen=True)
class Family:
    """Launches timed together as one step: `launch` / `form` are checkpointing_ssu's launch= and
    no_write_form=; `blocks` are the coupled knob groups block coordinate descent searches together."""
    name: str
    launch: str
    form: str
    launches: tuple
    blocks: tuple


def _main_blocks(launch):
    # the write main's column halves take registers off: searched with the programs per SM they make room for
    occupancy = ("ctas_per_sm", "maxnreg", "col_split") if launch == "write" else ("ctas_per_sm", "maxnreg")
    # prefetch fills L2 for the tiles the pipeline's prologue loads: searched with the stages
    blocks = ((launch, ("BLOCK_P", "num_warps")), (launch, ("stages", "prefetch")), (launch, occupancy),
              (launch, ("tma",)))
    return blocks + (((launch, ("side_stream",)),) if launch == "write" else ())


FAMILIES = {
    "fused": Family("fused", "dynamic", "rectangle", ("fused",),
                    (("fused", ("BLOCK_P", "num_warps")), ("fused", ("maxnreg",)), ("fused", ("TN_MIN", "tma")))),
    "split": Family("split", "split", "rectangle", ("coef", "write", "no_write"),
                    (("coef", ("HB", "num_warps")), ("coef", ("maxnreg",)))
                    + _main_blocks("write") + _main_blocks("no_write")),
    "replay": Family("replay", "split", "replay", ("fused.write", "fused.no_write"),
                     (("fused.write", ("num_warps", "maxnreg")), ("fused.write", ("TN_MIN", "tma")),
                      ("fused.no_write", ("num_warps", "maxnreg")), ("fused.no_write", ("TN_MIN", "tma")))),
}


def default_knobs(launch: str) -> dict:
    """A launch's knobs as DEFAULT sets them (the fused sub-launches: the top level under their overrides)."""
    names = [k.name for k in KNOBS[launch]]
    if launch.startswith("fused."):
        top = DEFAULT["fused"]
        return {n: {**top, **top[launch.split(".")[1]]}[n] for n in names}
    return {n: DEFAULT[launch][n] for n in names}


def config_of(point: dict) -> dict:
    """A point as a config override (tuning.overridden's shape)."""
    cfg = {}
    for launch, knobs in point.items():
        if launch.startswith("fused."):
            cfg.setdefault("fused", {})[launch.split(".")[1]] = dict(knobs)
        else:
            cfg.setdefault(launch, {}).update(knobs)
    return cfg


def override_of(cand: dict) -> dict:
    """The config override a candidate ({"family", "point"}) is timed under. The replay family's
    sub-launches run over DEFAULT's fused top level, set here so no table changes them while timing
    (the offline compile assumes the same)."""
    cfg = config_of(cand["point"])
    if cand["family"] == "replay":
        cfg["fused"] = {**default_knobs("fused"), **cfg["fused"]}
    return cfg


def _block_p(bp: int, t: Target) -> int:
    # specssm/step/launch.py's _block_p: a tile holds whole rows, at most MAX_TILE elements
    return min(bp, max(16, next_pow2(t.P)), max(16, MAX_TILE // next_pow2(t.N)))


def _tma_ok(t: Target) -> bool:
    # contiguous pools: every stride is a multiple of a row (N elements), which must be 16-byte aligned
    return t.N * STATE_BYTES[t.state] % 16 == 0


def tiles(t: Target, block_p: int) -> int:
    return t.batch * -(-t.P // block_p) * t.H


def effective(launch: str, knobs: dict, t: Target) -> dict:
    """The knobs as the launcher runs them for target t."""
    eff = dict(knobs)
    if "BLOCK_P" in eff:
        eff["BLOCK_P"] = _block_p(eff["BLOCK_P"], t)
    if "HB" in eff:
        eff["HB"] = min(eff["HB"], t.hpg & -t.hpg)
    if "TN_MIN" in eff and next_pow2(t.T) >= 16:
        eff["TN_MIN"] = 8           # the token tile is 16 either way; 8 names it
    if eff.get("tma") and not _tma_ok(t):
        eff["tma"] = False
    if eff.get("col_split", 1) > 1 and (KIND[t.state] >= 3 or next_pow2(t.N) < 32):
        eff["col_split"] = 1        # a scaled state's row needs its whole amax; halves of >= 16 columns
    if "ctas_per_sm" in eff:
        # programs per SM beyond what the tiles fill give the same grid as the smallest value that fills it
        n_tiles = tiles(t, eff["BLOCK_P"])
        values = [c for c in _knob(launch, "ctas_per_sm").values if c <= eff["ctas_per_sm"]]
        eff["ctas_per_sm"] = next(c for c in values if c * t.num_sms >= n_tiles or c == eff["ctas_per_sm"])
    return eff


def _knob(launch, name) -> Knob:
    return next(k for k in KNOBS[launch] if k.name == name)


def launch_reason(launch: str, knobs: dict, t: Target) -> str | None:
    """Why a launch's knobs are not a point to time for target t (None: keep it)."""
    eff = effective(launch, knobs, t)
    for name, v in knobs.items():
        if eff[name] != v:
            return f"{launch}.{name}={v} runs as {eff[name]}"
    bp = knobs.get("BLOCK_P")
    if bp is not None and t.P % bp and bp < t.P:
        return f"{launch}.BLOCK_P={bp} neither divides P={t.P} nor covers it"
    if knobs.get("tma") and (next_pow2(t.N) > TMA_BOX or (bp or 0) > TMA_BOX):
        return f"{launch}: TMA box larger than {TMA_BOX}"
    if launch in ("write", "no_write"):
        ctas, warps = knobs["ctas_per_sm"], knobs["num_warps"]
        if ctas * warps > SM_WARPS:
            return f"{launch}: {ctas} programs x {warps} warps exceed {SM_WARPS} warps per SM"
        if knobs["maxnreg"] and ctas * warps * 32 * knobs["maxnreg"] > SM_REGISTERS:
            return (f"{launch}: {ctas} programs x {warps} warps x 32 x {knobs['maxnreg']} registers exceed "
                    f"{SM_REGISTERS} per SM")
        tile = bp * next_pow2(t.N) * STATE_BYTES[t.state] // knobs.get("col_split", 1)
        if knobs["tma"] and ctas * tile > SM_SHARED:
            return f"{launch}: {ctas} programs x a {tile}-byte TMA tile exceed {SM_SHARED} bytes of shared memory"
    return None


def point_reason(family: Family, point: dict, t: Target) -> str | None:
    for launch in family.launches:
        why = launch_reason(launch, point[launch], t)
        if why:
            return why
    return None


def launch_points(launch: str, t: Target) -> list[dict]:
    """Every valid setting of one launch's knobs for target t, in knob-value order."""
    return list(_launch_points(launch, t))


@functools.lru_cache(maxsize=1024)
def _launch_points(launch: str, t: Target) -> tuple:
    # cached: plans of many cases count their points for the ETA (callers copy before changing one)
    names = [k.name for k in KNOBS[launch]]
    combos = (dict(zip(names, vs)) for vs in itertools.product(*(k.values for k in KNOBS[launch])))
    return tuple(c for c in combos if launch_reason(launch, c, t) is None)


def count_valid(family: Family, t: Target) -> int:
    """Valid points of the family (its launches' rules are independent: a product)."""
    n = 1
    for launch in family.launches:
        n *= len(launch_points(launch, t))
    return n


def all_points(family: Family, t: Target) -> list[dict]:
    per = [launch_points(launch, t) for launch in family.launches]
    return [{launch: dict(knobs) for launch, knobs in zip(family.launches, combo)} for combo in itertools.product(*per)]


def default_point(family: Family, t: Target) -> dict:
    """DEFAULT's setting of the family's knobs, as it runs (clamped knobs at their effective values):
    the incumbent every search starts from and is measured against."""
    return {launch: effective(launch, default_knobs(launch), t) for launch in family.launches}


def block_points(family: Family, point: dict, block: tuple) -> list[dict]:
    """Every point that differs from `point` only in the block's knobs (launch, names), valid or not."""
    launch, names = block
    out = []
    for vs in itertools.product(*(_knob(launch, n).values for n in names)):
        knobs = {**point[launch], **dict(zip(names, vs))}
        if knobs != point[launch]:
            out.append({**point, launch: knobs})
    return out


def block_neighbors(family: Family, point: dict, block: tuple, t: Target) -> list[dict]:
    """The valid points among block_points."""
    return [p for p in block_points(family, point, block) if launch_reason(block[0], p[block[0]], t) is None]


def random_point(family: Family, t: Target, rng: random.Random) -> dict:
    return {launch: dict(rng.choice(launch_points(launch, t))) for launch in family.launches}


_SHORT = {"BLOCK_P": "P", "num_warps": "w", "stages": "s", "ctas_per_sm": "c", "maxnreg": "r", "HB": "HB",
          "TN_MIN": "tn", "col_split": "h", "prefetch": "pf", "side_stream": "ss"}


def describe(point: dict) -> str:
    """A point in one short line: `write P64 w4 s2 c4 tma r-` per launch."""
    parts = []
    for launch, knobs in point.items():
        bits = []
        for name, v in knobs.items():
            if name == "tma":
                bits.append("tma" if v else "ptr")
            elif name in ("prefetch", "side_stream"):
                bits.append(_SHORT[name] if v else "no" + _SHORT[name])
            else:
                bits.append(f"{_SHORT[name]}{'-' if v is None else v}")
        parts.append(f"{launch} " + " ".join(bits))
    return " | ".join(parts)
