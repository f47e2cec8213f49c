"""Workloads for the serving simulator: who asks for how many tokens, and when.

A request has a prompt of ``input_len`` tokens and will generate ``output_len`` tokens; both are
known to the simulator in advance (that is what lets the ``oracle`` policy reserve exactly), and
``input_len + output_len <= max_len`` always holds (the model's context window).

Synthetic lengths. The PagedAttention paper (Kwon et al., SOSP 2023) publishes only the *means*
of its two data sets (``../shared/reference/figures.md``): ShareGPT 161.31 input / 337.99 output
tokens, Alpaca 19.31 / 58.45. Lengths of real prompts and answers are skewed (many short ones, a
long tail), so each length is drawn from a lognormal distribution, rounded, and clipped to
``[1, max_len - 1]``; the output is then clipped again to ``max_len - input_len`` so that the
request fits. The spread ``sigma`` of each lognormal is an assumption (ShareGPT 1.0 in / 0.9 out,
Alpaca 0.7 / 0.8); its location ``mu`` is solved for so that the *clipped* distribution has the
published mean (:func:`lognormal_mu`), so with ``max_len = 2048`` large samples match the
published means to within about one percent.

Shared prefixes (``prefix``). Alpaca-like questions, each behind one of ``num_prefixes`` system
prompts of ``prefix_len`` tokens (a chat template, few-shot examples): the case prefix caching is
for. ``input_len`` counts the system prompt too.

Arrivals. ``rate`` is the mean number of arrivals per simulated step (a Poisson process); the
default ``inf`` puts every request at step 0, which keeps the KV cache under full pressure, the
setting of the paper's memory study. Arrival times come from their own random stream, so changing
the rate never changes the lengths.

Traces (:func:`load_trace`). CSV with a header row, or JSON lines (one object per line), with
columns/keys ``input_len`` and ``output_len`` (positive integers), and optionally ``arrival`` (the
step at which the request arrives, a number >= 0, rounded up to a whole step; default 0),
``prefix_id`` (any label: requests with equal labels share one system prompt) and ``prefix_len``
(its length, default ``min(prefix_len, input_len)``). Unknown columns are ignored; a malformed
line raises :class:`~minipaged.errors.TraceFormatError` naming the file and the line.

Token ids. The block manager's prefix cache compares token ids, so the simulator gives every
token an id (:func:`token_id`): the same system prompt gets the same ids in every request, and
everything else gets ids that no other request or sample uses, so cache hits happen exactly where
real prompts would share text.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minipaged.errors import InvalidRequest, TraceFormatError

# (mean input, mean output) published for each data set, and the assumed lognormal sigmas.
PUBLISHED_MEANS: dict[str, tuple[float, float]] = {
    "sharegpt": (161.31, 337.99),
    "alpaca": (19.31, 58.45),
}
SIGMAS: dict[str, tuple[float, float]] = {"sharegpt": (1.0, 0.9), "alpaca": (0.7, 0.8)}
WORKLOADS = ("sharegpt", "alpaca", "prefix")

MAX_POSITION = 1 << 21  # token positions (and so max_len) stay below this; see token_id


@dataclass(frozen=True)
class Request:
    """One request of a workload. ``prefix_len`` leading prompt tokens are the shared system
    prompt ``prefix_id`` (``prefix_len == 0`` and ``prefix_id is None`` when there is none)."""

    id: int
    input_len: int
    output_len: int
    arrival: int = 0
    prefix_id: int | None = None
    prefix_len: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("id", 0), ("input_len", 1), ("output_len", 1), ("arrival", 0)):
            _check_count(name, getattr(self, name), minimum)
        if self.prefix_id is None:
            if self.prefix_len != 0:
                raise InvalidRequest(f"prefix_len {self.prefix_len!r} needs a prefix_id")
        else:
            _check_count("prefix_id", self.prefix_id, 0)
            _check_count("prefix_len", self.prefix_len, 1)
            if self.prefix_len > self.input_len:
                raise InvalidRequest(
                    f"prefix_len {self.prefix_len} is longer than input_len {self.input_len}"
                )

    @property
    def total_len(self) -> int:
        """Slots the request's KV cache holds when it completes (per sample)."""
        return self.input_len + self.output_len


def token_id(request: Request, position: int, sample: int = -1) -> int:
    """The token id at ``position`` of ``request``; ``sample >= 0`` names an output sample.

    Invariant: two positions get the same id exactly when both lie in the same system prompt at
    the same position (so only shared prefixes can hit the prefix cache). Ids are packed as
    ``((request * 1024 + sample + 1) * 2**21 + position)`` (system-prompt tokens: negative), so
    positions must be below 2**21 and samples below 1023.
    """
    if sample < 0 and position < request.prefix_len:
        return -1 - (request.prefix_id * MAX_POSITION + position)  # type: ignore[operator]
    return ((request.id * 1024 + sample + 1) * MAX_POSITION) + position


def prompt_tokens(request: Request) -> list[int]:
    """The ids of the whole prompt, system prompt first."""
    return [token_id(request, i) for i in range(request.input_len)]


# ----- synthetic lengths ------------------------------------------------------------------------


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """``E[min(max(X, lo), hi)]`` for ``X ~ LogNormal(mu, sigma)``, in closed form: the mass
    below ``lo`` counts as ``lo``, above ``hi`` as ``hi``, and in between
    ``E[X; lo < X < hi] = exp(mu + sigma**2 / 2) * (Phi(b - sigma) - Phi(a - sigma))`` with
    ``a, b`` the standardised logs of the bounds."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    middle = math.exp(mu + sigma * sigma / 2) * (_phi(b - sigma) - _phi(a - sigma))
    return lo * _phi(a) + hi * (1.0 - _phi(b)) + middle


def lognormal_mu(mean: float, sigma: float, lo: float, hi: float) -> float:
    """The ``mu`` for which the lognormal clipped to ``[lo, hi]`` has the given mean (bisection:
    the clipped mean grows with ``mu``)."""
    if not lo < mean < hi:
        raise InvalidRequest(f"a mean of {mean} cannot be reached with lengths in [{lo}, {hi}]")
    left, right = math.log(lo) - 10 * sigma - 10, math.log(hi) + 10 * sigma + 10
    for _ in range(200):
        mid = (left + right) / 2
        if clipped_lognormal_mean(mid, sigma, lo, hi) < mean:
            left = mid
        else:
            right = mid
    return (left + right) / 2


def _lengths(rng: np.random.Generator, mean: float, sigma: float, n: int, hi: int) -> np.ndarray:
    """``n`` lengths in ``[1, hi]`` with the given mean after clipping; when ``hi`` is too small
    for that mean (a tiny ``max_len``), the unclipped lognormal has it and clipping lowers it."""
    if 1 < mean < hi:
        mu = lognormal_mu(mean, sigma, 1, hi)
    else:
        mu = math.log(mean) - sigma * sigma / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, hi).astype(np.int64)


def _pairs(
    rng: np.random.Generator, kind: str, n: int, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (input, output) length pairs of a data set, each pair fitting in ``max_len``."""
    (mean_in, mean_out), (sigma_in, sigma_out) = PUBLISHED_MEANS[kind], SIGMAS[kind]
    inputs = _lengths(rng, mean_in, sigma_in, n, max_len - 1)
    outputs = _lengths(rng, mean_out, sigma_out, n, max_len - 1)
    return inputs, np.minimum(outputs, max_len - inputs)


def arrivals(n: int, rate: float, seed: int) -> list[int]:
    """Arrival steps of ``n`` requests from a Poisson process of ``rate`` arrivals per step
    (non-decreasing; all 0 when ``rate`` is infinite)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise InvalidRequest(f"rate must be a positive number of requests per step, got {rate!r}")
    _check_count("seed", seed, 0)
    if math.isinf(rate):
        return [0] * n
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, n)
    return [int(t) for t in np.floor(np.cumsum(gaps))]


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_max_len(max_len: object) -> int:
    """``max_len`` must leave room for one input and one output token, and fit token ids."""
    _check_count("max_len", max_len, 2)
    if max_len > MAX_POSITION:  # type: ignore[operator]
        raise InvalidRequest(f"max_len must be at most {MAX_POSITION}, got {max_len}")
    return max_len  # type: ignore[return-value]


def make_workload(
    name: str,
    num_requests: int,
    seed: int = 0,
    max_len: int = 2048,
    rate: float = math.inf,
    num_prefixes: int = 4,
    prefix_len: int = 256,
) -> list[Request]:
    """``num_requests`` requests of the synthetic workload ``name`` (one of :data:`WORKLOADS`),
    the same list for the same arguments on every machine (numpy's PCG64 stream per seed)."""
    if name not in WORKLOADS:
        raise InvalidRequest(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    _check_count("num_requests", num_requests, 1)
    _check_count("seed", seed, 0)
    check_max_len(max_len)
    rng = np.random.default_rng([seed, 0])
    steps = arrivals(num_requests, rate, seed)
    if name != "prefix":
        inputs, outputs = _pairs(rng, name, num_requests, max_len)
        return [Request(i, int(inputs[i]), int(outputs[i]), steps[i]) for i in range(num_requests)]
    _check_count("num_prefixes", num_prefixes, 1)
    _check_count("prefix_len", prefix_len, 1)
    if prefix_len > max_len - 2:
        raise InvalidRequest(
            f"prefix_len {prefix_len} leaves no room for a question and an answer in "
            f"max_len {max_len}"
        )
    questions, outputs = _pairs(rng, "alpaca", num_requests, max_len - prefix_len)
    which = rng.integers(0, num_prefixes, num_requests)
    return [
        Request(
            i,
            prefix_len + int(questions[i]),
            int(outputs[i]),
            steps[i],
            prefix_id=int(which[i]),
            prefix_len=prefix_len,
        )
        for i in range(num_requests)
    ]


# ----- trace files ------------------------------------------------------------------------------


def _rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, record) for every non-blank data line of a CSV or JSONL trace."""
    suffix = path.suffix.lower()
    first = text.lstrip()[:1]
    if suffix in (".jsonl", ".ndjson", ".json") or (suffix != ".csv" and first == "{"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TraceFormatError(f"{path}:{number}: expected a JSON object, got {line!r}")
            yield number, record
        return
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    for column in ("input_len", "output_len"):
        if column not in header:
            raise TraceFormatError(f"{path}:1: the header has no {column!r} column: {header}")
    for record in reader:
        number = reader.line_num
        if not any(v.strip() for v in record.values() if isinstance(v, str)):
            continue
        if None in record:
            raise TraceFormatError(f"{path}:{number}: more fields than the header has")
        missing = [k for k, v in record.items() if v is None]
        if missing:
            raise TraceFormatError(f"{path}:{number}: no value for {missing[0]!r}")
        yield number, {k: v for k, v in record.items() if v.strip() != ""}


def _integer(value: object, where: str, name: str, minimum: int) -> int:
    """A whole number >= minimum from a JSON number or a CSV string."""
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
        raise TraceFormatError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return number


def _arrival(value: object, where: str) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    ok = not isinstance(number, bool) and isinstance(number, int | float)
    if not ok or not math.isfinite(number) or number < 0:  # type: ignore[arg-type]
        raise TraceFormatError(f"{where}: arrival must be a number >= 0, got {value!r}")
    return math.ceil(number)  # type: ignore[arg-type]


def load_trace(path: str | Path, max_len: int = 2048, prefix_len: int = 256) -> list[Request]:
    """Read a CSV or JSONL trace (format in the module docstring), sorted by arrival (ties keep
    file order; ``id`` is the position in the file). ``prefix_len`` is the system prompt length
    used where a line has a ``prefix_id`` but no ``prefix_len``."""
    path = Path(path)
    check_max_len(max_len)
    _check_count("prefix_len", prefix_len, 1)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TraceFormatError(f"{path}: not UTF-8 text") from None
    labels: dict[str, int] = {}
    requests: list[Request] = []
    for number, record in _rows(path, text):
        where = f"{path}:{number}"
        for key in ("input_len", "output_len"):
            if key not in record:
                raise TraceFormatError(f"{where}: missing {key!r}")
        input_len = _integer(record["input_len"], where, "input_len", 1)
        output_len = _integer(record["output_len"], where, "output_len", 1)
        if input_len + output_len > max_len:
            raise TraceFormatError(
                f"{where}: input_len + output_len = {input_len + output_len} exceeds "
                f"max_len {max_len}"
            )
        arrival = _arrival(record.get("arrival", 0), where)
        prefix_id, plen = None, 0
        if record.get("prefix_id") is not None:
            prefix_id = labels.setdefault(str(record["prefix_id"]), len(labels))
            plen = min(prefix_len, input_len)
            if "prefix_len" in record:
                plen = _integer(record["prefix_len"], where, "prefix_len", 1)
                if plen > input_len:
                    raise TraceFormatError(
                        f"{where}: prefix_len {plen} is longer than input_len {input_len}"
                    )
        elif "prefix_len" in record:
            raise TraceFormatError(f"{where}: prefix_len given without a prefix_id")
        requests.append(Request(len(requests), input_len, output_len, arrival, prefix_id, plen))
    if not requests:
        raise TraceFormatError(f"{path}: the trace holds no requests")
    return sorted(requests, key=lambda r: (r.arrival, r.id))
