"""What one benchmark run measures: shapes, strategy variants and the list of cases (pure, CPU-safe)."""
from __future__ import annotations

from dataclasses import dataclass

from specssm.bench import strategies as sts
from specssm.bench.peer import PEERS

SHAPES = {
    # name: (H, P, N, G) per tensor-parallel rank: Nemotron-3-Super at TP8 and at TP1
    "super_tp8": (16, 64, 128, 1),
    "tp1": (128, 64, 128, 8),
}
LAUNCHES = ("auto", "split", "dynamic")      # the launch modes of checkpointing_ssu
NO_WRITE_FORMS = ("rectangle", "replay")
STATE_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")
ROUNDINGS = ("rn", "sr")
BATCHES = tuple(2 ** i for i in range(11))          # 1 .. 1024
STRATEGIES = sts.NAMES


@dataclass(frozen=True)
class Shape:
    name: str
    H: int
    P: int
    N: int
    G: int


@dataclass(frozen=True)
class Variant:
    """One way of running the step: strategy (+ launch mode, no-write form and a tuning override for
    checkpointing). `config`: a tuning override (specssm/step/tuning.py) as sorted JSON, "" for none."""
    strategy: str
    launch: str = "auto"
    no_write_form: str = "rectangle"
    config: str = ""

    @property
    def label(self) -> str:
        if self.strategy in PEERS:
            return self.strategy
        st = sts.STRATEGIES[self.strategy]
        if st.variants:
            form = "rect" if self.no_write_form == "rectangle" else "replay"
            return f"{st.label}/{self.launch}/{form}" + (f" {self.config}" if self.config else "")
        return st.label


@dataclass(frozen=True)
class Case:
    shape: Shape
    variant: Variant
    state_dtype: str
    rounding: str
    scenario: str        # mixed | all_write | all_no_write; "any" for the baselines (they always write)
    batch: int
    T: int
    W: int

    def key(self) -> dict:
        s = self.variant.strategy
        st = sts.STRATEGIES.get(s)       # None for a peer
        d = {"shape": self.shape.name, "H": self.shape.H, "P": self.shape.P, "N": self.shape.N,
             "G": self.shape.G, "T": self.T, "W": self.W, "strategy": s,
             "launch": self.variant.launch if st is not None and st.launch else "-",
             "no_write_form": self.variant.no_write_form if st is not None and st.variants else "-",
             "variant": self.variant.label, "config": self.variant.config, "state_dtype": self.state_dtype,
             "rounding": self.rounding,
             "scenario": self.scenario, "batch": self.batch}
        return d


def cache_strategy(strategy: str) -> str:
    """The strategy whose caches a case runs on: a peer runs on those of sts.PEER_CACHES."""
    return sts.PEER_CACHES if strategy in PEERS else strategy


SHAPE_SYNTAX = "[name:]HxPxNxG"      # one custom shape on a command line (lists of them are comma-separated)


def parse_shape(spec: str) -> Shape:
    """A named shape (super_tp8, tp1) or `[name:]HxPxNxG`, e.g. `nano:64x64x128x8` (the `specssm bench`
    and `specssm tune` syntax)."""
    if spec in SHAPES:
        return Shape(spec, *SHAPES[spec])
    name, _, dims = spec.rpartition(":")
    try:
        H, P, N, G = (int(v) for v in dims.split("x"))
    except ValueError:
        raise ValueError(f"--shapes: expected one of {sorted(SHAPES)} or {SHAPE_SYNTAX}, got {spec!r}") from None
    if min(H, P, N, G) < 1 or H % G:
        raise ValueError(f"--shapes: expected positive sizes with G dividing H, got {spec!r}")
    return Shape(name or f"H{H}P{P}N{N}G{G}", H, P, N, G)


def variants(strategies, launches, forms, configs=("",)) -> list[Variant]:
    out = []
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"--strategies: expected names from {STRATEGIES}, got {s!r}")
        if sts.STRATEGIES[s].variants:
            out += [Variant(s, launch, form, cfg) for launch in launches for form in forms for cfg in configs]
        else:
            out.append(Variant(s, "auto", "rectangle"))
    return out


def expand(*, shapes, strategies, launches, forms, dtypes, roundings, scenarios, batches, T, W,
           peers=(), configs=("",)) -> list[Case]:
    """All cases of a run, grouped so consecutive cases can share one cache:
    shape > state dtype > batch > strategy > scenario > variant > rounding.

    Peers (`--peer`) run on the checkpointing caches: in each scenario, right after our checkpointing
    variants (every rounding), so one cache and one pnat draw serve both and their figures compare.

    `configs` (`--sweep`): tuning overrides as sorted JSON ("" none); each checkpointing variant runs
    under each of them.

    Baselines run once per (shape, dtype, batch, rounding) with scenario "any"; all-states has no
    rounding choice (it stores in the state dtype directly) and runs with "rn" only. In the all-write
    scenario the no-write form does not matter, so only the rectangle form runs there.
    """
    for name, values, allowed in (("--launch", launches, LAUNCHES), ("--no-write-form", forms, NO_WRITE_FORMS),
                                  ("--dtypes", dtypes, STATE_DTYPES), ("--rounding", roundings, ROUNDINGS)):
        for v in values:
            if v not in allowed:
                raise ValueError(f"{name}: expected values from {allowed}, got {v!r}")
    from specssm.bench.mix import SCENARIOS
    for sc in scenarios:
        if sc not in SCENARIOS:
            raise ValueError(f"--scenarios: expected values from {SCENARIOS}, got {sc!r}")
    for b in batches:
        if b < 1:
            raise ValueError(f"--batches: expected positive batch sizes, got {b}")
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"--peer: expected names from {PEERS}, got {name!r}")
    vs = variants(strategies, launches, forms, configs)
    pvs = [Variant(name) for name in peers]
    cases = []
    for shape in shapes:
        for dt in dtypes:
            for batch in batches:
                for strategy, st in sts.STRATEGIES.items():
                    svs = [v for v in vs if v.strategy == strategy]
                    peers_here = pvs if strategy == sts.PEER_CACHES else []
                    if not svs and not peers_here:
                        continue
                    if not st.scenarios:
                        rnds = list(roundings) if st.rounding else ["rn"]
                        cases += [Case(shape, svs[0], dt, r, "any", batch, T, W) for r in rnds]
                        continue
                    for sc in scenarios:
                        for v in svs:
                            if sc == "all_write" and v.no_write_form != "rectangle" and "rectangle" in forms:
                                continue
                            cases += [Case(shape, v, dt, r, sc, batch, T, W) for r in roundings]
                        cases += [Case(shape, v, dt, r, sc, batch, T, W) for v in peers_here for r in roundings]
    return cases
