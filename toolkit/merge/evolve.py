"""`toolkit evolve CONFIG`: merge recipes evolved over a set of models, scored by the eval suite.

A candidate (a `Genome`) is a three-step merge recipe, one technique from each of Agent Forge's three pairs:
1. interpolation of the models: `linear` or `slerp` (mergekit's multislerp, SLERP for any number of inputs),
   with one weight per model;
2. task arithmetic against their common base: `ties` or `dare_ties`, with one weight and one density per
   model;
3. a layer path through the two results: `frankenmerge` (each layer taken whole from one of them: mergekit's
   passthrough slices) or `dfs` (each position may also take the neighbouring layer, with an input scale:
   toolkit/merge/dfs.py).
The recipe is written as a multi-document mergekit config (named steps, as mergekit-multimerge reads) and
run by `toolkit.merge.run.merge_documents`, so every candidate is an ordinary merge.

Generation 0 is Agent Forge's start: the 8 combinations of one technique per pair, at neutral settings
(population above 8: mutants of them). Each next generation keeps the elite, merges the losers in groups of
three (gene averages, majority techniques), and fills the rest with children of tournament-selected parents
(uniform crossover, then mutation of weights, densities, layer choices, offsets and scales, and now and then
a technique). `strategy: cma` instead runs CMA-ES (the `cma` package, as mergekit-evolve does) on the
continuous genes, with the techniques of generation 0's best.

Fitness comes from the eval suite: the `eval:` section hook registered by the eval package (accuracy and
answer likelihood on held-out checkable tasks, perplexity on held-out text), weighted. Diversity is the mean
distance between the genomes of a generation (0: clones, 1: nothing shared). Every evaluation is appended to
`evaluations.jsonl` and the generation's state written atomically to `evolve.json`, so a killed run resumes
where it stopped and evaluates no candidate twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import ToolkitError, nearest, unknown_key_message
from toolkit.io import atomic_path, write_json, write_text

PAIRS = {"interpolate": ("linear", "slerp"), "task": ("ties", "dare_ties"), "layers": ("frankenmerge", "dfs")}
STATE = "evolve.json"
EVALUATIONS = "evaluations.jsonl"
CHAMPION = "champion"
RECIPE = "merge.yaml"
SCALE_RANGE = (0.5, 1.5)  # a DFS input scale
DENSITY_RANGE = (0.1, 1.0)


@dataclass
class FitnessOptions:
    """How a candidate is scored: an `eval:` section's measures, weighted."""

    tasks: str | None = field(default=None, metadata={"input": "file"})  # held-out checkable tasks
    families: list[str] = field(default_factory=list)  # keep rows of these task families (default: all)
    limit: int | None = None  # rows per family
    perplexity: str | None = field(default=None, metadata={"input": "file"})  # held-out text
    perplexity_limit: int | None = 32  # texts
    max_new_tokens: int = 16
    # accuracy: exact match, mean over families; likelihood: exp(-answer NLL per token, mean over families),
    # the right answers' geometric-mean token probability (it moves before accuracy does); perplexity: the
    # best parent's perplexity over the candidate's (1.0 = as good as the best parent).
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "likelihood": 1.0})

    def __post_init__(self) -> None:
        for key in self.weights:
            if key not in ("accuracy", "likelihood", "perplexity"):
                raise ValueError(
                    unknown_key_message(key, ("accuracy", "likelihood", "perplexity"), "weights")
                )
        if not self.tasks and not self.perplexity:
            raise ValueError("give tasks (held-out checkable tasks) and/or perplexity (held-out text)")
        if self.weights.get("perplexity") and not self.perplexity:
            raise ValueError("weights.perplexity needs a perplexity file")


@dataclass
class EvolveOptions:
    """An evolution: its models, search and fitness (the `evolve:` section of a recipe, or a config file)."""

    models: list[str] = field(default_factory=list)  # two or more fine-tunes of one base
    base_model: str | None = None  # their common ancestor (task vectors are taken against it)
    generations: int = 50
    population: int = 8
    elite: int = 2
    tournament: int = 3
    mutation_rate: float = 0.3
    mutation_sigma: float = 0.15
    # Agent Forge's target: below it, random immigrants replace the newest children (0 turns it off).
    diversity_floor: float = 0.3
    strategy: str = "genetic"  # or cma
    seed: int = 0
    dtype: str = "float32"
    fitness: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError("models: two or more models to merge")
        if not self.base_model:
            raise ValueError(
                "base_model: the models' common base (ties and dare_ties take task vectors from it)"
            )
        if self.strategy not in ("genetic", "cma"):
            guess = nearest(self.strategy, ("genetic", "cma"))
            raise ValueError(
                f"strategy '{self.strategy}'"
                + (f" (did you mean '{guess}'?)" if guess else "")
                + "; one of genetic, cma"
            )
        if self.population < 2:
            raise ValueError(f"population: {self.population}; at least 2")
        if not 0 <= self.elite < self.population:
            raise ValueError(f"elite: {self.elite}; from 0 to population - 1 ({self.population - 1})")
        if self.generations < 1:
            raise ValueError("generations >= 1")
        self.fitness = dataclasses.asdict(FitnessOptions(**self.fitness))


def parse_options(raw: dict[str, Any], where: str) -> EvolveOptions:
    """`raw` as EvolveOptions; an unknown key names the nearest valid one."""
    valid = {f.name for f in dataclasses.fields(EvolveOptions)}
    fitness_keys = {f.name for f in dataclasses.fields(FitnessOptions)}
    problems = [unknown_key_message(k, valid, where) for k in raw if k not in valid]
    problems += [
        unknown_key_message(k, fitness_keys, f"{where}.fitness")
        for k in raw.get("fitness") or {}
        if k not in fitness_keys
    ]
    if problems:
        raise ToolkitError("\n".join(problems))
    try:
        return EvolveOptions(**raw)
    except (TypeError, ValueError) as error:
        raise ToolkitError(f"{where}: {error}") from None


@dataclass
class Genome:
    """One merge recipe: a technique per pair and its genes, every gene in [0, 1] (mapped to its range when
    the recipe is written), so that mutation, crossover, distance and CMA-ES treat them alike."""

    interpolate: str
    task: str
    layers: str
    weights: list[float]  # per model, interpolation
    task_weights: list[float]  # per model, task arithmetic
    densities: list[float]  # per model, mapped to DENSITY_RANGE
    choice: list[float]  # per layer: < 0.5 takes the interpolation's layer, else the task merge's
    offset: list[float]  # per layer (dfs): < 1/3 the layer before, > 2/3 the layer after, else the same
    scale: list[float]  # per layer (dfs): the input scale, mapped to SCALE_RANGE

    def key(self) -> str:
        data = dataclasses.asdict(self)
        for name, value in data.items():
            if isinstance(value, list):
                data[name] = [round(v, 4) for v in value]
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def combination(self) -> str:
        return f"{self.interpolate}+{self.task}+{self.layers}"

    def vector(self) -> list[float]:
        return [*self.weights, *self.task_weights, *self.densities, *self.choice, *self.offset, *self.scale]

    def with_vector(self, values: list[float]) -> Genome:
        values = [min(1.0, max(0.0, v)) for v in values]
        sizes = [
            len(self.weights),
            len(self.task_weights),
            len(self.densities),
            len(self.choice),
            len(self.offset),
            len(self.scale),
        ]
        parts, start = [], 0
        for size in sizes:
            parts.append(values[start : start + size])
            start += size
        return Genome(self.interpolate, self.task, self.layers, *parts)


def _span(value: float, low: float, high: float) -> float:
    return low + value * (high - low)


def neutral_genome(techniques: tuple[str, str, str], models: int, layers: int) -> Genome:
    """A combination at neutral settings: equal weights, density 0.5, the first half of the layers from the
    interpolation and the rest from the task merge, no offsets, scale 1."""
    return Genome(
        *techniques,
        weights=[0.5] * models,
        task_weights=[0.5] * models,
        densities=[(0.5 - DENSITY_RANGE[0]) / (DENSITY_RANGE[1] - DENSITY_RANGE[0])] * models,
        choice=[0.25 if i < layers // 2 else 0.75 for i in range(layers)],
        offset=[0.5] * layers,
        scale=[(1.0 - SCALE_RANGE[0]) / (SCALE_RANGE[1] - SCALE_RANGE[0])] * layers,
    )


def starting_combinations(pairs: dict[str, tuple[str, ...]] = PAIRS) -> list[tuple[str, str, str]]:
    """The 8 combinations of one technique from each pair (4 where the layer path is frankenmerge only)."""
    return list(itertools.product(*pairs.values()))


def technique_pairs(folder: str | Path) -> dict[str, tuple[str, ...]]:
    """The techniques the models in `folder`'s family take: all of PAIRS, except DFS for an architecture that
    declares no residual-writing layers (its input scales would have no weights to fold into, e.g. cognate,
    whose blocks read sums of streams): its layer paths are frankenmerges."""
    from toolkit.merge.dfs import residual_writers

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    try:
        residual_writers(model_type)
    except ToolkitError:
        return {**PAIRS, "layers": ("frankenmerge",)}
    return dict(PAIRS)


def recipe_documents(
    genome: Genome, models: list[str], base: str, layers: int, dtype: str
) -> list[dict[str, Any]]:
    """The genome as mergekit configs: `interpolate` and `task` (named intermediates) and the final layer path."""
    interpolate: dict[str, Any] = {
        "name": "interpolate",
        "merge_method": "linear" if genome.interpolate == "linear" else "multislerp",
        "models": [
            {"model": m, "parameters": {"weight": round(0.05 + w, 4)}}
            for m, w in zip(models, genome.weights, strict=True)
        ],
        "dtype": dtype,
    }
    if genome.interpolate == "linear":
        interpolate["parameters"] = {"normalize": True}
    task = {
        "name": "task",
        "merge_method": genome.task,
        "base_model": base,
        "models": [
            {"model": m, "parameters": {"weight": round(w, 4), "density": round(_span(d, *DENSITY_RANGE), 4)}}
            for m, w, d in zip(models, genome.task_weights, genome.densities, strict=True)
        ],
        "dtype": dtype,
    }
    slices = []
    for position in range(layers):
        source = "interpolate" if genome.choice[position] < 0.5 else "task"
        layer = position
        out: dict[str, Any] = {}
        if genome.layers == "dfs":
            offset = genome.offset[position]
            layer = min(layers - 1, max(0, position + (-1 if offset < 1 / 3 else 1 if offset > 2 / 3 else 0)))
            scale = round(_span(genome.scale[position], *SCALE_RANGE), 4)
            if scale != 1.0:
                out["parameters"] = {"scale": scale}
        slices.append({"sources": [{"model": source, "layer_range": [layer, layer + 1]}], **out})
    if genome.layers == "frankenmerge":  # contiguous runs of one source become one slice, as users write them
        runs: list[dict[str, Any]] = []
        for entry in slices:
            source = entry["sources"][0]
            if runs and runs[-1]["sources"][0]["model"] == source["model"]:
                runs[-1]["sources"][0]["layer_range"][1] = source["layer_range"][1]
            else:
                runs.append(entry)
        slices = runs
    final = {
        "merge_method": "dfs" if genome.layers == "dfs" else "passthrough",
        "slices": slices,
        "dtype": dtype,
    }
    return [interpolate, task, final]


def diversity(genomes: list[Genome]) -> float:
    """Mean pairwise distance: per gene |a - b| (genes in [0, 1]), a technique counting 1 when it differs."""
    if len(genomes) < 2:
        return 0.0
    distances = []
    for a, b in itertools.combinations(genomes, 2):
        genes = [abs(x - y) for x, y in zip(a.vector(), b.vector(), strict=True)]
        techniques = [float(getattr(a, p) != getattr(b, p)) for p in PAIRS]
        distances.append((statistics.fmean(genes) + statistics.fmean(techniques)) / 2)
    return statistics.fmean(distances)


def mutate(
    genome: Genome, rng: random.Random, rate: float, sigma: float, pairs: dict[str, tuple[str, ...]] = PAIRS
) -> Genome:
    """Each gene moves by N(0, sigma) with probability `rate`; a technique flips with probability rate/4."""
    values = [
        min(1.0, max(0.0, v + rng.gauss(0, sigma))) if rng.random() < rate else v for v in genome.vector()
    ]
    child = genome.with_vector(values)
    for pair, choices in pairs.items():
        if rng.random() < rate / 4 and len(choices) > 1:
            setattr(child, pair, choices[1 - choices.index(getattr(child, pair))])
    return child


def crossover(a: Genome, b: Genome, rng: random.Random) -> Genome:
    """Uniform crossover: each gene and technique from either parent."""
    values = [x if rng.random() < 0.5 else y for x, y in zip(a.vector(), b.vector(), strict=True)]
    child = a.with_vector(values)
    for pair in PAIRS:
        setattr(child, pair, getattr(a if rng.random() < 0.5 else b, pair))
    return child


def merge_genomes(group: list[Genome]) -> Genome:
    """Losers merged into one: the mean of their genes, the majority technique of each pair."""
    vectors = [g.vector() for g in group]
    child = group[0].with_vector([statistics.fmean(column) for column in zip(*vectors, strict=True)])
    for pair in PAIRS:
        votes = [getattr(g, pair) for g in group]
        setattr(child, pair, max(sorted(set(votes)), key=votes.count))
    return child


def tournament(scored: list[tuple[Genome, float]], rng: random.Random, size: int) -> Genome:
    entrants = rng.sample(scored, min(size, len(scored)))
    return max(entrants, key=lambda pair: pair[1])[0]


def next_generation(
    scored: list[tuple[Genome, float]],
    options: EvolveOptions,
    rng: random.Random,
    pairs: dict[str, tuple[str, ...]] = PAIRS,
) -> list[Genome]:
    """Elite kept, losers merged in threes, the rest children of tournament winners (crossover + mutation)."""
    ranked = [g for g, _ in sorted(scored, key=lambda pair: pair[1], reverse=True)]
    population = options.population
    children = ranked[: options.elite]
    losers = ranked[len(ranked) - 3 * max(1, population // 4) :] if len(ranked) >= 6 else []
    for start in range(0, len(losers), 3):
        if len(children) < population:
            # Averaged genes of genomes that differ in little but their techniques would repeat one of them:
            # a light mutation keeps the slot a new candidate.
            merged = merge_genomes(losers[start : start + 3])
            children.append(mutate(merged, rng, options.mutation_rate, options.mutation_sigma / 2, pairs))
    bred = len(children)
    while len(children) < population:
        a = tournament(scored, rng, options.tournament)
        b = tournament(scored, rng, options.tournament)
        children.append(
            mutate(crossover(a, b, rng), rng, options.mutation_rate, options.mutation_sigma, pairs)
        )
    # Below the diversity floor, the newest children give way to random immigrants (elite and merged losers
    # stay): a population of near-clones has stopped searching.
    replaceable = list(range(population - 1, bred - 1, -1))
    while replaceable and diversity(children) < options.diversity_floor:
        children[replaceable.pop(0)] = random_genome(children[0], rng, pairs)
    return children


def random_genome(template: Genome, rng: random.Random, pairs: dict[str, tuple[str, ...]] = PAIRS) -> Genome:
    """Uniform genes and a random technique per pair, of `template`'s sizes."""
    child = template.with_vector([rng.random() for _ in template.vector()])
    for pair, choices in pairs.items():
        setattr(child, pair, rng.choice(choices))
    return child


class Fitness:
    """Scores a model folder with the registered `eval:` hook and combines the measures by weight."""

    def __init__(self, options: dict[str, Any]) -> None:
        from toolkit.io import read_jsonl
        from toolkit.stages import section_hooks

        hooks = section_hooks()
        if "eval" not in hooks:
            raise ToolkitError("fitness needs the eval package (its `eval:` hook), which is not installed")
        self.hook = hooks["eval"]
        self.options = options
        self.weights = options["weights"]
        self.reference_perplexity: float | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="forge-fitness-"))
        # One rows file per task family: each family counts the same, whatever its answers' length.
        self.families: dict[str, Path] = {}
        if options["tasks"]:
            rows = read_jsonl(options["tasks"])
            present = sorted({r.get("task", "all") for r in rows})
            unknown = [f for f in options["families"] if f not in present]
            if unknown:
                raise ToolkitError(
                    f"fitness.families: {unknown} not in {options['tasks']} (it has {present})"
                )
            for family in options["families"] or present:
                kept = [r for r in rows if r.get("task", "all") == family][: options["limit"]]
                path = self._workdir / f"{family}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))
                self.families[family] = path
        self.texts_file: Path | None = None
        if options["perplexity"]:
            texts = read_jsonl(options["perplexity"])[: options["perplexity_limit"]]
            self.texts_file = self._workdir / "texts.jsonl"
            self.texts_file.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in texts))

    def _run(self, outcome: Any, tasks: Path | None, perplexity: Path | None) -> dict[str, Any]:
        from toolkit.stages import resolve

        spec = dataclasses.asdict(
            resolve(self.hook.schema)(
                tasks=str(tasks) if tasks else None,
                perplexity=str(perplexity) if perplexity else None,
                max_new_tokens=self.options["max_new_tokens"],
                batch_size=64,
                samples=0,
            )
        )
        return resolve(self.hook.run)(None, outcome, spec) or {}

    def measure(self, folder: Path) -> dict[str, Any]:
        """The raw measures of the model in `folder`: per family, exact-match accuracy and the right answers'
        NLL per token; their means; perplexity on the held-out text."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from toolkit.models import register_auto_classes
        from toolkit.stages import StageOutcome

        register_auto_classes()
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        outcome = StageOutcome(final=folder, model=model, tokenizer=AutoTokenizer.from_pretrained(folder))
        measures: dict[str, Any] = {}
        if self.families:
            results = {f: self._run(outcome, path, None)["tasks"] for f, path in self.families.items()}
            measures["per_task"] = {f: r["accuracy"] for f, r in results.items()}
            measures["per_task_nll"] = {f: r["answer_nll"] for f, r in results.items()}
            measures["accuracy"] = statistics.fmean(measures["per_task"].values())
            measures["answer_nll"] = statistics.fmean(measures["per_task_nll"].values())
            # The union's cross-entropy with each family weighted alike: forgetting one skill costs as much
            # as knowing another gains (a mean of per-family likelihoods would let one strong skill carry it).
            measures["likelihood"] = math.exp(-measures["answer_nll"])
        if self.texts_file is not None:
            ppl = self._run(outcome, None, self.texts_file)["perplexity"]
            measures["perplexity_value"] = ppl["perplexity"] if isinstance(ppl, dict) else float(ppl)
        return measures

    def score(self, measures: dict[str, Any]) -> float:
        """The weighted mean of the measures' scores (each in [0, 1], higher is better)."""
        scores = {"accuracy": measures.get("accuracy"), "likelihood": measures.get("likelihood")}
        if "perplexity_value" in measures and self.reference_perplexity:
            scores["perplexity"] = min(1.0, self.reference_perplexity / measures["perplexity_value"])
        used = {k: w for k, w in self.weights.items() if w and scores.get(k) is not None}
        return sum(w * scores[k] for k, w in used.items()) / sum(used.values())

    def close(self) -> None:
        shutil.rmtree(self._workdir, ignore_errors=True)


def _layers(folder: str) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    return int(config.get("num_hidden_layers", config.get("n_layer")))


class Evolution:
    """One evolution in `out/`: state, evaluations, champion, plot."""

    def __init__(
        self, options: EvolveOptions, out: Path, models: list[str], base: str, champion: Path
    ) -> None:
        self.options = options
        self.out = out
        self.champion = champion
        self.models = models
        self.base = base
        self.layers = _layers(base)
        depths = {m: _layers(m) for m in models}
        if set(depths.values()) != {self.layers}:
            raise ToolkitError(f"evolve: every model needs the base's {self.layers} layers; found {depths}")
        self.fitness = Fitness(options.fitness)
        self.evaluations: dict[str, dict[str, Any]] = {}
        self.log = print
        self.pairs = technique_pairs(base)
        if self.pairs["layers"] != PAIRS["layers"]:
            self.log(
                "evolve: no DFS layer paths for this architecture (no residual-writing layers): frankenmerge only"
            )

    # -- evaluation -------------------------------------------------------------------------------------
    def _load_evaluations(self) -> None:
        path = self.out / EVALUATIONS
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.evaluations[record["key"]] = record

    def _record(self, record: dict[str, Any]) -> None:
        self.evaluations[record["key"]] = record
        with (self.out / EVALUATIONS).open("a") as handle:  # append-only: a kill loses at most this line
            handle.write(json.dumps(record) + "\n")

    def build(self, genome: Genome, out: Path) -> None:
        """Merge the genome's recipe into `out`."""
        from toolkit.merge.run import merge_documents

        documents = recipe_documents(genome, self.models, self.base, self.layers, self.options.dtype)
        merge_documents(documents, out, seed=self.options.seed, where=f"candidate {genome.key()}")

    def evaluate(self, genome: Genome) -> float:
        key = genome.key()
        if key in self.evaluations:
            return self.evaluations[key]["fitness"]
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="candidate-", dir=self.out) as tmp:
            folder = Path(tmp) / "model"
            self.build(genome, folder)
            measures = self.fitness.measure(folder)
        fitness = self.fitness.score(measures)
        self._record(
            {
                "key": key,
                "genome": dataclasses.asdict(genome),
                "combination": genome.combination,
                "fitness": fitness,
                "measures": measures,
                "seconds": round(time.monotonic() - start, 2),
            }
        )
        return fitness

    def evaluate_parents(self, state: dict[str, Any]) -> None:
        """Each parent (and the base) scored once: the reference the gain is measured from."""
        if "parents" in state:
            self.fitness.reference_perplexity = state.get("reference_perplexity")
            return
        parents = {}
        for name in [*self.models, self.base]:
            parents[name] = self.fitness.measure(Path(name))
        values = [
            m["perplexity_value"] for n, m in parents.items() if n != self.base and "perplexity_value" in m
        ]
        self.fitness.reference_perplexity = min(values) if values else None
        state["reference_perplexity"] = self.fitness.reference_perplexity
        state["parents"] = {n: {"measures": m, "fitness": self.fitness.score(m)} for n, m in parents.items()}
        state["base_folder"] = self.base

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        state_path = self.out / STATE
        if state_path.exists() and not resume:
            raise ToolkitError(
                f"{self.out} holds an evolution already: --resume continues it, or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state and state.get("options") != dataclasses.asdict(self.options):
            raise ToolkitError(f"{self.out}: the evolution there ran with other options; use another --out")
        self._load_evaluations()
        state.setdefault("options", dataclasses.asdict(self.options))
        state.setdefault("history", [])
        self.evaluate_parents(state)
        write_json(state_path, state)
        rng = random.Random(self.options.seed)
        if state.get("rng"):
            rng.setstate(_tuples(state["rng"]))
        population = [Genome(**g) for g in state.get("population", [])] or self.first_generation(rng)
        strategy = CMA(self, state) if self.options.strategy == "cma" else None
        while len(state["history"]) < self.options.generations:
            generation = len(state["history"])
            if strategy is not None and generation > 0:
                population = strategy.ask()
            start = time.monotonic()
            scored = [(g, self.evaluate(g)) for g in population]
            if strategy is not None and generation > 0:
                strategy.tell(scored)
            fitnesses = [f for _, f in scored]
            best_genome, best = max(scored, key=lambda pair: pair[1])
            entry = {
                "generation": generation,
                "best": best,
                "mean": statistics.fmean(fitnesses),
                "diversity": diversity(population),
                "combinations": sorted({g.combination for g in population}),
                "best_key": best_genome.key(),
                "best_combination": best_genome.combination,
                "seconds": round(time.monotonic() - start, 1),
            }
            state["history"].append(entry)
            if generation == 0:
                state["initial_best"] = {
                    "key": best_genome.key(),
                    "fitness": best,
                    "combination": best_genome.combination,
                }
            if strategy is None:
                population = next_generation(scored, self.options, rng, self.pairs)
            elif generation == 0:
                strategy.start(best_genome)
                population = []
            state["population"] = [dataclasses.asdict(g) for g in population]
            state["rng"] = rng.getstate()
            if strategy is not None:
                strategy.save()
            write_json(state_path, state)
            self.log(
                f"generation {generation + 1}/{self.options.generations}: best {best:.4f} mean {entry['mean']:.4f} "
                f"diversity {entry['diversity']:.3f} ({entry['seconds']:.0f} s)"
            )
        self.finish(state)
        write_json(state_path, state)
        plot_fitness(state["history"], self.out / "plots" / "fitness.png")
        return state

    def first_generation(self, rng: random.Random) -> list[Genome]:
        """The 8 combinations at neutral settings; a population above 8 adds mutants of them. A population
        below 8 is reached after generation 0, which always scores all 8."""
        combos = [neutral_genome(c, len(self.models), self.layers) for c in starting_combinations(self.pairs)]
        extra = [
            mutate(
                combos[i % len(combos)],
                rng,
                max(self.options.mutation_rate, 0.5),
                self.options.mutation_sigma,
                self.pairs,
            )
            for i in range(max(0, self.options.population - len(combos)))
        ]
        return combos + extra

    def champion_record(self) -> dict[str, Any]:
        return max(self.evaluations.values(), key=lambda r: r["fitness"])

    def finish(self, state: dict[str, Any]) -> None:
        """The champion rebuilt as `out/champion/` (an HF folder with its merge recipe) and the summary."""
        record = self.champion_record()
        genome = Genome(**record["genome"])
        champion = self.champion
        self.build(genome, champion)
        documents = recipe_documents(genome, self.models, self.base, self.layers, self.options.dtype)
        write_text(champion / RECIPE, yaml.safe_dump_all(documents, sort_keys=False))
        parents = {n: p["fitness"] for n, p in state["parents"].items() if n != self.base}
        best_parent = max(parents.values())
        state["champion"] = {
            "folder": str(champion),
            "key": record["key"],
            "combination": record["combination"],
            "fitness": record["fitness"],
            "measures": record["measures"],
            "gain_over_best_parent_pct": 100 * (record["fitness"] - best_parent) / best_parent
            if best_parent
            else None,
            "gain_over_initial_best_pct": 100
            * (record["fitness"] - state["initial_best"]["fitness"])
            / state["initial_best"]["fitness"]
            if state["initial_best"]["fitness"]
            else None,
            "beats_every_parent": all(record["fitness"] > f for f in parents.values()),
        }
        state["combinations_used"] = sorted({r["combination"] for r in self.evaluations.values()})
        state["combinations_possible"] = len(starting_combinations(self.pairs))
        for folder in (self.out, champion):  # the champion carries how it was found
            write_text(folder / "report.md", report_table(state))


class CMA:
    """CMA-ES over the continuous genes, techniques fixed to generation 0's best (the `cma` package)."""

    def __init__(self, evolution: Evolution, state: dict[str, Any]) -> None:
        self.evolution = evolution
        self.state = state
        self.path = evolution.out / "cma.pickle"
        self.template: Genome | None = Genome(**state["cma_template"]) if state.get("cma_template") else None
        self.es = None
        if self.template is not None and self.path.exists():
            import pickle

            # Written by this class into the evolution's own folder (CMA-ES's state is a Python object).
            self.es = pickle.loads(self.path.read_bytes())  # noqa: S301
        self.asked: list[list[float]] = []

    def start(self, template: Genome) -> None:
        import cma

        self.template = template
        self.state["cma_template"] = dataclasses.asdict(template)
        options = self.evolution.options
        self.es = cma.CMAEvolutionStrategy(
            template.vector(),
            0.2,
            {"bounds": [0, 1], "popsize": options.population, "seed": options.seed + 1, "verbose": -9},
        )

    def ask(self) -> list[Genome]:
        self.asked = self.es.ask()
        return [self.template.with_vector(list(map(float, x))) for x in self.asked]

    def tell(self, scored: list[tuple[Genome, float]]) -> None:
        self.es.tell(self.asked, [-f for _, f in scored])  # CMA-ES minimises

    def save(self) -> None:
        if self.es is not None:
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(self.es.pickle_dumps())


def _tuples(value: Any) -> Any:
    """JSON turned random.getstate()'s tuples into lists; setstate wants them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def report_table(state: dict[str, Any]) -> str:
    """Parents, the best starting combination and the champion, side by side."""
    lines = [
        "| model | fitness | accuracy | answer nll | likelihood | perplexity |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, fitness: float, measures: dict[str, Any]) -> str:
        def fmt(key: str, digits: int = 4) -> str:
            value = measures.get(key)
            return "-" if value is None else f"{value:.{digits}f}"

        cells = [fmt("accuracy"), fmt("answer_nll", 3), fmt("likelihood"), fmt("perplexity_value", 2)]
        return f"| {name} | {fitness:.4f} | " + " | ".join(cells) + " |"

    for name, parent in state["parents"].items():
        label = Path(name).parent.name if Path(name).name == "final" else name
        role = "base" if name == state.get("base_folder") else "parent"
        lines.append(row(f"{role} {label}", parent["fitness"], parent["measures"]))
    initial = state["initial_best"]
    lines.append(
        f"| best starting combination ({initial['combination']}) | {initial['fitness']:.4f} | | | | |"
    )
    champion = state["champion"]
    lines.append(row(f"champion ({champion['combination']})", champion["fitness"], champion["measures"]))
    gain = champion["gain_over_best_parent_pct"]
    lines += [
        "",
        f"Fitness gain over the best parent: {gain:+.1f}%; over the best starting combination: "
        f"{champion['gain_over_initial_best_pct']:+.1f}%. Combinations tried: {len(state['combinations_used'])} of "
        f"{state.get('combinations_possible', 8)}. Answer nll: nats per token of the right answers, mean over the task families (lower is better).",
    ]
    per_family = {n: p["measures"].get("per_task_nll") for n, p in state["parents"].items()}
    per_family["champion"] = champion["measures"].get("per_task_nll")
    if all(per_family.values()):
        families = list(per_family["champion"])
        lines += [
            "",
            "| answer nll by family | " + " | ".join(families) + " |",
            "|---" * (len(families) + 1) + "|",
        ]
        for name, values in per_family.items():
            label = Path(name).parent.name if Path(name).name == "final" else name
            lines.append(f"| {label} | " + " | ".join(f"{values[f]:.2f}" for f in families) + " |")
    return "\n".join(lines) + "\n"


def plot_fitness(history: list[dict[str, Any]], out_png: Path) -> Path:
    """Best and mean fitness, and diversity, per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = [h["generation"] for h in history]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(generations, [h["best"] for h in history], label="best")
    top.plot(generations, [h["mean"] for h in history], label="mean")
    top.set_ylabel("fitness")
    top.legend()
    bottom.plot(generations, [h["diversity"] for h in history], color="tab:green")
    bottom.set_ylabel("diversity")
    bottom.set_xlabel("generation")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return out_png


def evolve(
    options: EvolveOptions,
    out: Path,
    champion: Path | None = None,
    resolve: Callable[[str], str | None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or resume) an evolution into `out` (the champion into `champion`, default out/champion);
    `resolve` maps model names to folders (a recipe's stages)."""
    from toolkit.run_folder import model_folder_of

    def folder(name: str) -> str:
        if resolve is not None and (mapped := resolve(name)) is not None:
            return mapped
        if not Path(name).exists():
            raise ToolkitError(f"evolve: {name}: no such model folder")
        return str(model_folder_of(name)[0])

    evolution = Evolution(
        options,
        out,
        [folder(m) for m in options.models],
        folder(options.base_model),
        champion or out / CHAMPION,
    )
    try:
        return evolution.run(resume=resume)
    finally:
        evolution.fitness.close()
