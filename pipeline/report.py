"""`report`: one static HTML page with thumbnails and plots over an index and its outputs.

The page is `index.html` (inline CSS, no script, no external URL) with PNG files beside it:
`thumbs/` (examples, read back from their shards by key) and `plots/` (matplotlib, Agg).
It goes to `report/` inside the index by default, through the index's storage, so a report
of an s3:// index lands on S3 and opens from anywhere that can read it.

Sections: the summary (manifest and build statistics) always; then one per output that
exists: queries (`query/results.parquet`), self-influence (`rank/summary.json` and the rank
ends), duplicates (`dedup/<mode>/groups.parquet`, or an older `dedup/<mode>.parquet`) and
groups (`groups/<field>.{stats,matrix}.parquet`). A file that lacks a column its section
needs is a clear error; a missing file just omits its section. The report reads only what it
shows (never every row of the index): the rank ends and summary, the shown duplicate
groups' rows (row group by row group), the query results, the small group tables.
Building is two-phase: sections read their data and declare the thumbnails they show, then
they are read back for all of them (one ranged read per example where the parts record its
byte span, else each shard streamed once), then the HTML is rendered. Every string from
the data (keys, shards, metadata, group names) is HTML-escaped.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from pipeline.data.lookup import (
    SPAN_COLUMNS,
    Span,
    fit_image,
    placeholder,
    png_bytes,
    shard_thumbnails,
    spans_by_shard,
)
from pipeline.index.columnar import open_parquet, read_columns
from pipeline.index.layout import DEDUP_DIR, GROUPS_DIR, QUERY_DIR, REPORT_DIR
from pipeline.index.reader import Index
from pipeline.index.scan import iter_parts
from pipeline.influence.reliability import CONSEQUENCE as RELIABILITY_CONSEQUENCE
from pipeline.influence.reliability import LABELS as RELIABILITY_LABELS
from pipeline.influence.reliability import REMEDY as RELIABILITY_REMEDY
from pipeline.rank import LEGACY as LEGACY_RANK
from pipeline.rank import read_rank_ends, read_rank_summary
from pipeline.storage import Storage, open_storage, read_uri, safe_name

log = logging.getLogger(__name__)

QUERY_RESULTS = f"{QUERY_DIR}/results.parquet"
PAGE = "index.html"
# Columns each section needs (a file without them is refused with its name and columns).
RANK_COLUMNS = ["key", "shard", "self_influence", "rank"]
QUERY_COLUMNS = ["query", "direction", "rank", "key", "shard", "influence", "normalized_influence"]
DEDUP_COLUMNS = ["key", "shard", "group", "kept", "reason", "similarity"]
STATS_COLUMNS = ["group", "count", "self_influence_mean", "top_share"]
MATRIX_COLUMNS = ["group_a", "group_b", "mean_influence", "mean_cosine"]


@dataclass
class ReportConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    out: str | None = None  # folder or URI for index.html; default: `report/` inside the index
    thumb_size: int = 96  # thumbnails fit in this square (pixels)
    extremes: int = 12  # highest and lowest self-influence examples shown
    queries: int = 8  # queries shown (in the order of the results file)
    top: int = 8  # proponents and opponents shown per query
    dup_groups: int = 12  # duplicate groups shown per dedup mode, largest first
    dup_members: int = 8  # members shown per duplicate group
    groups: int = 30  # groups in the charts and heatmaps, most populous first
    workers: int = 8  # shards streamed (and files written) in parallel


def run_report(config: ReportConfig) -> str:
    """Write the report; returns the URL of its index.html."""
    if config.thumb_size < 8:
        raise ValueError(f"thumb_size must be at least 8, got {config.thumb_size}")
    index = Index(config.index)
    out = open_storage(config.out) if config.out else index.storage.child(REPORT_DIR)
    page = Page(config)
    builders = (summary_section, query_section, rank_section, dedup_sections, group_sections)
    sections = [s for build in builders for s in build(index, page)]
    page.fetch(thumb_spans(index, page.thumbs, config.workers))
    body = "\n".join(section.html() for section in sections)
    page.publish(out, render_page(index.storage.uri, sections, body, page))
    url = out.url(PAGE)
    print(f"report: {len(sections)} sections, {len(page.thumbs)} thumbnails -> {url}")
    return url


# ----------------------------------------------------------------------------- the page


@dataclass
class Section:
    id: str
    title: str
    html: Callable[[], str]  # called after the thumbnails are fetched


class Page:
    """What the sections put on the page: thumbnails to fetch, plots and other files."""

    def __init__(self, config: ReportConfig) -> None:
        self.config = config
        self.thumbs: dict[tuple[str, str], str] = {}  # (shard, key) -> file name
        self.sources: dict[str, str] = {}  # query image URI or path -> file name
        self.files: dict[str, bytes] = {}
        self.missing: dict[str, str] = {}  # file name -> why it is a placeholder

    def thumb(self, key: str, shard: str) -> str:
        """File name of the thumbnail of example (key, shard); fetched later."""
        name = f"thumbs/{_digest(shard, key)}.png"
        self.thumbs[(shard, key)] = name
        return name

    def source(self, uri: str) -> str:
        """File name of the thumbnail of an image outside the index (a query image)."""
        name = f"thumbs/q-{_digest('source', uri)}.png"
        self.sources[uri] = name
        return name

    def plot(self, name: str, figure: Figure) -> str:
        path = f"plots/{safe_name(name)}.png"
        self.files[path] = figure_png(figure)
        return path

    def fetch(self, spans: dict[str, dict[str, Span]] | None = None) -> None:
        """Read the thumbnails back (by `spans` where known, else each shard streamed once);
        placeholders (and reasons) for what is unreadable."""
        size, tile = self.config.thumb_size, placeholder(self.config.thumb_size)
        images, missing = shard_thumbnails(self.thumbs, size, self.config.workers, spans)
        for pair, name in self.thumbs.items():
            self.files[name] = images.get(pair, tile)
            if pair in missing:
                self.missing[name] = missing[pair]
        with ThreadPoolExecutor(max(1, self.config.workers)) as pool:
            done = pool.map(lambda uri: _source_thumb(uri, size), self.sources)
            for (uri, name), (png, reason) in zip(self.sources.items(), done, strict=True):
                self.files[name] = png or tile
                if reason:
                    self.missing[name] = reason
                    log.warning("query image %s not readable: %s", uri, reason)

    def tile(self, name: str, key: str, caption: Iterable[str] = (), css: str = "") -> str:
        """One thumbnail with its key and caption lines (all escaped)."""
        reason = self.missing.get(name)
        classes = " ".join(c for c in ("tile", css, "missing" if reason else "") if c)
        lines = [f'<span class="key">{esc(key)}</span>']
        lines += [f"<span>{esc(line)}</span>" for line in caption]
        if reason:
            lines.append(f'<span class="why">image unavailable: {esc(reason)}</span>')
        side = self.config.thumb_size
        return (
            f'<figure class="{classes}"><img src="{esc(name)}" alt="{esc(key)}" '
            f'title="{esc(key)}" style="max-width:{side}px;max-height:{side}px">'
            f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
        )

    def publish(self, out: Storage, page: str) -> None:
        """Every PNG first, index.html last (its presence means the report is whole)."""
        with ThreadPoolExecutor(max(1, self.config.workers)) as pool:
            list(pool.map(lambda item: out.write_bytes(*item), self.files.items()))
        out.write_bytes(PAGE, page.encode("utf-8"))


def thumb_spans(
    index: Index, pairs: Iterable[tuple[str, str]], workers: int = 8
) -> dict[str, dict[str, Span]]:
    """shard -> key -> byte span of the (shard, key) pairs, from the parts of their shards
    (key and span columns only); none for an index whose parts predate spans."""
    if not set(SPAN_COLUMNS) <= index.columns():
        return {}
    parts = {entry["url"]: entry["part"] for entry in index.manifest["shards"]}
    wanted: dict[str, set[str]] = {}
    for shard, key in pairs:
        if shard in parts:
            wanted.setdefault(shard, set()).add(key)

    def spans(shard: str) -> dict[str, Span]:
        try:
            table = index.read_part(parts[shard], ["key", "shard", *SPAN_COLUMNS])
        except (pa.ArrowInvalid, KeyError):  # a part written before spans were recorded
            return {}
        found = spans_by_shard(table).get(shard, {})
        return {key: found[key] for key in wanted[shard] if key in found}

    with ThreadPoolExecutor(max(1, min(workers, len(wanted) or 1))) as pool:
        return dict(zip(wanted, pool.map(spans, wanted), strict=True))


def _digest(*parts: str) -> str:
    text = "\0".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=12).hexdigest()


def _source_thumb(uri: str, size: int) -> tuple[bytes | None, str | None]:
    """(PNG, None) of an image file or object, or (None, reason); never raises."""
    try:
        return png_bytes(fit_image(read_uri(uri), size)), None
    except FileNotFoundError:
        return None, "missing_image_file"
    except Exception as exc:  # unreadable, undecodable, denied: the report goes on
        return None, getattr(exc, "reason", type(exc).__name__)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 4) -> str:
    """Compact number text; '' for None, 'nan' for NaN."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(value) else f"{float(value):.{digits}g}"
    return str(value)


def figure_png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)  # Agg explicitly: no pyplot, no global backend state
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def plot_label(value: Any, limit: int = 24) -> str:
    """A group name as a tick label: shortened, with '$' escaped (no mathtext from data)."""
    text = "(none)" if value is None else str(value)
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def render_page(uri: str, sections: list[Section], body: str, page: Page) -> str:
    nav = " · ".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    missing = len(page.missing)
    note = f'<p class="why">{missing} image(s) unavailable (placeholders)</p>' if missing else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>influence-ssl report: {esc(uri)}</title><style>{CSS}</style></head>\n"
        f'<body><h1>influence-ssl report</h1><p class="uri">{esc(uri)}</p>'
        f"<nav>{nav}</nav>{note}\n{body}\n</body></html>\n"
    )


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{margin:0 0 .2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.uri{color:#666;overflow-wrap:anywhere}nav{margin:.5em 0 1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;
text-align:left;vertical-align:top;overflow-wrap:anywhere}th{background:#f4f4f4}
.tiles{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:.3em 0 .8em}
.tile{margin:0;padding:4px;border:1px solid #ddd;border-radius:4px;max-width:160px;
font-size:11px;background:#fff}.tile img{display:block;image-rendering:pixelated;
margin:0 auto 2px}.tile .key{font-family:monospace;overflow-wrap:anywhere}
.kept{border:2px solid #1a7f37;background:#eefbf0}.query{border:2px solid #0969da}
.missing{background:#fff4f4}.why{color:#b00}.row{display:flex;gap:1em;align-items:flex-start}
.label{font-weight:600;margin:.4em 0 .1em}.dupgroup{border-left:3px solid #ccc;padding-left:.6em}
.warning{color:#9a3412;background:#fff7ed;border:1px solid #fdba74;padding:.4em .6em}
img.plot{max-width:100%}
"""


def read_parquet(
    storage: Storage, path: str, required: list[str], optional: Iterable[str] | None = ()
) -> pa.Table:
    """The required (checked) and present optional columns (None: all) of one output, by
    ranged reads of its footer and those columns."""
    with open_parquet(storage, path) as file:
        names = file.schema_arrow.names
        lacking = [c for c in required if c not in names]
        if lacking:
            raise ValueError(
                f"{storage.url(path)} lacks column(s) {lacking} needed by the report "
                f"(it has {names}); rerun the verb that wrote it"
            )
        optional = names if optional is None else optional
        return file.read(required + [c for c in optional if c in names and c not in required])


def labelled(label: str, tiles: str) -> str:
    """A label over a row of tiles (`tiles` is already HTML)."""
    return f'<div class="label">{esc(label)}</div><div class="tiles">{tiles}</div>'


def kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(num(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def data_table(table: pa.Table, limit: int) -> str:
    """Rows of a small table (first `limit`), every cell escaped."""
    head = "".join(f"<th>{esc(name)}</th>" for name in table.column_names)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(num(v))}</td>" for v in row.values()) + "</tr>"
        for row in table.slice(0, limit).to_pylist()
    )
    more = (
        f"<p>{table.num_rows - limit:,} more rows not shown.</p>" if table.num_rows > limit else ""
    )
    return f"<table><tr>{head}</tr>{body}</table>{more}"


# ----------------------------------------------------------------------------- summary


def summary_section(index: Index, page: Page) -> list[Section]:
    manifest = index.manifest
    model = manifest.get("model") or {}
    factors = manifest.get("factors") or {}
    stats = manifest.get("stats") or {}
    fingerprint = manifest.get("fingerprint") or {}
    shards = manifest.get("shards") or []
    examples = stats.get("examples", sum(int(s.get("examples", 0)) for s in shards))
    damping = list((factors.get("damping") or {}).values())
    rows: list[tuple[str, Any]] = [
        ("index", index.storage.uri),
        ("model", model.get("arch")),
        ("checkpoint", model.get("checkpoint") or "none (initialisation only)"),
        ("checkpoint sha256", (model.get("checkpoint_sha256") or "")[:16]),
        ("representation", model.get("representation")),
        ("examples", examples),
        (
            "shards",
            f"{stats.get('shards_done', len(shards))} of {stats.get('shards_total', len(shards))}",
        ),
        ("dimension of w", manifest.get("dimension")),
        ("vector dtype", manifest.get("vector_dtype")),
        ("curvature", factors.get("curvature")),
        ("tracked layers", _tracked_text(manifest, len(fingerprint.get("layers") or []))),
        ("projection", json.dumps(fingerprint.get("projection"), sort_keys=True)),
        ("damping (mean over layers)", float(np.mean(damping)) if damping else None),
        ("fit examples", factors.get("examples")),
        ("code version", manifest.get("code_version")),
        ("created", manifest.get("created")),
    ]
    rows = [(k, v) for k, v in rows if v not in (None, "")]  # e.g. no checkpoint hash
    build = _build_rows(stats)
    content = "<h3>Index</h3>" + kv_table(rows)
    content += _untracked_block(manifest.get("skipped_layers") or [])
    content += _reliability_block(manifest.get("reliability") or {})
    if build:
        content += "<h3>Build</h3>" + kv_table(build)
    return [Section("summary", "Summary", lambda: _wrap("summary", "Summary", content))]


def _tracked_text(manifest: dict, count: int) -> str:
    """The count, and with the coverage fit recorded: parameters tracked, share untracked."""
    counts = manifest.get("layer_parameters")
    if not counts:
        return str(count)
    return (
        f"{count} ({counts['tracked']:,} parameters; {counts['untracked_fraction']:.1%} of the "
        "weight parameters untracked, normalisation layers aside)"
    )


def _untracked_block(skipped: list[dict], limit: int = 20) -> str:
    """Layers with parameters that w does not cover, and why (recorded by fit)."""
    if not skipped:
        return ""
    table = pa.Table.from_pylist(
        [{k: entry.get(k) for k in ("name", "type", "parameters", "why")} for entry in skipped]
    )
    return "<h3>Untracked layers</h3>" + data_table(table, limit)


def _reliability_block(figures: dict) -> str:
    """How reproducible w is (two independent view sets), with a warning below target."""
    if not figures:
        return (
            "<h3>Reliability</h3><p>Not recorded (fitted by an older version, or with "
            "fit.reliability_sample=0).</p>"
        )
    targets = figures.get("targets") or {}
    rows = [
        ("views per example (V)", figures.get("views")),
        ("sample", figures.get("sample")),
    ]
    for name, label in RELIABILITY_LABELS.items():
        rows.append((f"{label} (target {targets.get(name, '?')})", figures.get(name)))
    projections = sorted((figures.get("projected") or {}).items(), key=lambda kv: int(kv[0]))
    for views, projected in projections:
        rows.append((f"projected at V = {views}: median cos", projected.get("median_cos")))
    html = "<h3>Reliability</h3>" + kv_table(rows)
    below = figures.get("below_targets") or []
    if below:
        html += "".join(
            f'<p class="warning">Below target: {esc(RELIABILITY_LABELS.get(name, name))} '
            f"({esc(RELIABILITY_CONSEQUENCE.get(name, ''))}). Raise influence.loss.num_views, "
            f"or {esc(RELIABILITY_REMEDY.get(name, 'refine (refine=)'))}.</p>"
            for name in below
        )
    return html


def _build_rows(stats: dict) -> list[tuple[str, Any]]:
    if not stats:
        return []
    read = stats.get("read") or {}
    skipped = read.get("skipped") or {}
    rows: list[tuple[str, Any]] = [
        ("examples seen", read.get("seen")),
        ("examples decoded", read.get("decoded")),
        ("worker seconds", stats.get("worker_seconds")),
        ("examples / worker second", stats.get("examples_per_worker_second")),
        ("failed shards", len(stats.get("failed") or [])),
        ("missing shards", len(stats.get("shards_missing") or [])),
    ]
    rows += [(f"skipped: {reason}", count) for reason, count in sorted(skipped.items())]
    return [(k, v) for k, v in rows if v is not None]


def _wrap(section_id: str, title: str, content: str) -> str:
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>\n{content}\n</section>'


# ----------------------------------------------------------------------------- queries


def query_section(index: Index, page: Page) -> list[Section]:
    if not index.storage.exists(QUERY_RESULTS):
        return []
    table = read_parquet(index.storage, QUERY_RESULTS, QUERY_COLUMNS, ["query_source"])
    rows = table.to_pylist()
    queries = list(dict.fromkeys(row["query"] for row in rows))
    shown = queries[: page.config.queries]
    sources = {r["query"]: r.get("query_source") for r in rows if r.get("query_source")}
    shards = _query_shards(index, rows, [q for q in shown if q not in sources])
    blocks = []
    for query in shown:
        if query in sources:
            name = page.source(sources[query])
        elif query in shards:
            name = page.thumb(query, shards[query])
        else:
            name = ""  # neither a file nor a key of the index
        mine = [r for r in rows if r["query"] == query]
        blocks.append(_query_block(page, query, name, sources.get(query), mine))

    def render() -> str:
        more = len(queries) - len(shown)
        note = f"<p>{more} more queries not shown.</p>" if more > 0 else ""
        intro = (
            f"<p>{len(queries)} queries; up to {page.config.top} proponents (influence &gt; 0: "
            "upweighting them lowers the query's loss) and opponents, ranked as in the results "
            "file; scores are influence &lt;w(q), w(t)&gt; and cosine.</p>"
        )
        return _wrap("queries", "Queries", intro + "".join(b() for b in blocks) + note)

    return [Section("queries", "Queries", render)]


def _query_shards(index: Index, rows: list[dict], keys: list[str]) -> dict[str, str]:
    """Shard of each query key: from the results (a query is often its own top proponent),
    else from the key index (build's `keys/`), else a scan of the parts' key column that
    stops once all are found (a key in no part is not in the index)."""
    wanted = set(keys)
    found = {r["key"]: r["shard"] for r in rows if r["key"] in wanted}
    rest = [k for k in keys if k not in found]
    if rest:
        found.update(_shards_by_key(index, rest))
    return found


def _shards_by_key(index: Index, keys: list[str]) -> dict[str, str]:
    from pipeline.index.keys import lookup_rows

    try:
        shards = index.take(lookup_rows(index, keys), ["shard"]).column("shard").to_pylist()
        return dict(zip(keys, shards, strict=True))
    except KeyError:  # some key is in no part: find the others by one scan
        pass
    found, wanted = {}, pa.array(keys, pa.string())
    for part in iter_parts(index, ["key", "shard"]):
        table = part.table.filter(pc.is_in(part.table.column("key"), wanted))
        for key, shard in zip(table["key"].to_pylist(), table["shard"].to_pylist(), strict=True):
            found.setdefault(key, shard)
        if len(found) == len(keys):
            break
    return found


def _query_block(
    page: Page, query: str, name: str, source: str | None, rows: list[dict]
) -> Callable[[], str]:
    directions = {
        d: sorted((r for r in rows if r["direction"] == d), key=lambda r: r["rank"])
        for d in ("proponent", "opponent")
    }
    for found in directions.values():
        for row in found[: page.config.top]:
            row["file"] = page.thumb(row["key"], row["shard"])

    def render() -> str:
        caption = [f"source: {source}"] if source else ["query (in the index)"]
        if name:
            head = page.tile(name, query, caption, "query")
        else:
            head = (
                f'<p class="why">query {esc(query)} is not in the index and has no image file</p>'
            )
        lists = []
        for direction, found in directions.items():
            tiles = "".join(
                page.tile(
                    r["file"],
                    r["key"],
                    [
                        f"#{r['rank']}  I={num(r['influence'])}",
                        f"cos={num(r['normalized_influence'], 3)}",
                    ],
                )
                for r in found[: page.config.top]
            )
            lists.append(labelled(f"{direction}s", tiles or "none"))
        return f'<div class="row">{head}<div>{"".join(lists)}</div></div><hr>'

    return render


# ----------------------------------------------------------------------------- self-influence


def rank_section(index: Index, page: Page) -> list[Section]:
    summary = read_rank_summary(index)
    if summary is None:
        return _old_rank_section() if index.storage.exists(LEGACY_RANK) else []
    table = read_rank_ends(index, page.config.extremes)
    lacking = [c for c in RANK_COLUMNS if c not in table.column_names]
    if lacking:
        raise ValueError(f"the rank ends lack column(s) {lacking} needed by the report: rerun rank")
    total = int(summary["rows"])
    count = min(page.config.extremes, total)
    rank = table.column("rank")
    ends = {
        "highest": table.filter(pc.less(rank, count)).to_pylist(),
        "lowest": table.filter(pc.greater_equal(rank, total - count)).to_pylist()[::-1],
    }
    refined = summary.get("refined")
    if refined and index.storage.exists(refined["file"]):
        top = read_columns(index.storage, refined["file"]).slice(0, count).to_pylist()
        ends = {f"highest, refined with {refined['views']} views,": top, **ends}
    plot = page.plot("self_influence", histogram(summary.get("histogram") or {}))
    for rows in ends.values():
        for row in rows:
            row["file"] = page.thumb(row["key"], row["shard"])
    quantiles = summary.get("quantiles") or {}

    def render() -> str:
        note = " (from a sample)" if quantiles.get("from") == "sample" else ""
        stats = kv_table(
            [
                ("examples", total),
                (f"median{note}", quantiles.get("median")),
                (f"p99{note}", quantiles.get("p99")),
                (f"max{note}", quantiles.get("max")),
            ]
        )
        parts = [stats, f'<img class="plot" src="{esc(plot)}" alt="self-influence histogram">']
        for end, rows in ends.items():
            tiles = "".join(page.tile(r["file"], r["key"], _rank_caption(r)) for r in rows)
            parts.append(labelled(f"{end} self-influence", tiles))
        intro = (
            "<p>Self-influence ||w(x)||²: high for atypical, augmentation-unstable or "
            "memorised examples.</p>"
        )
        return _wrap("self-influence", "Self-influence", intro + "".join(parts))

    return [Section("self-influence", "Self-influence", render)]


def _old_rank_section() -> list[Section]:
    """A rank output from before partitions (one file of every row): not read, named."""
    text = f'<p class="why">{esc(LEGACY_RANK)} predates the partitioned rank: rerun rank.</p>'
    content = _wrap("self-influence", "Self-influence", text)
    return [Section("self-influence", "Self-influence", lambda: content)]


def _rank_caption(row: dict) -> list[str]:
    if "refined_rank" in row:  # the refined top: its order first, the index's beside it
        lines = [
            f"#{row['refined_rank']} (index #{row['rank']})",
            f"s={num(row['refined_self_influence'])} (index {num(row['self_influence'])})",
        ]
    else:
        lines = [f"#{row['rank']}  s={num(row['self_influence'])}"]
    if row.get("loss") is not None:
        lines.append(f"loss={num(row['loss'], 3)}")
    if row.get("cls") is not None:
        lines.append(f"cls={row['cls']}")
    return lines


def histogram(counts: dict) -> Figure:
    """Self-influence on a log x axis from rank's fixed histogram (its bins merged
    to at most 80); non-positive values are counted aside."""
    figure = Figure(figsize=(7, 3))
    ax = figure.add_subplot()
    values = np.asarray(counts.get("counts") or [], np.int64)
    if values.size:
        merge = math.ceil(values.size / 80)
        values = np.pad(values, (0, -values.size % merge)).reshape(-1, merge).sum(1)
        steps = counts["first"] + merge * np.arange(values.size + 1)
        ax.stairs(values, 10.0 ** (steps / counts["bins_per_decade"]), fill=True, color="#4c72b0")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
    dropped = int(counts.get("non_positive", 0))
    note = f" ({dropped} non-positive not shown)" if dropped else ""
    ax.set_xlabel(f"self-influence (log scale){note}")
    ax.set_ylabel("examples")
    return figure


# ----------------------------------------------------------------------------- duplicates


def dedup_sections(index: Index, page: Page) -> list[Section]:
    """One section per dedup mode: its `<mode>/groups.parquet` (only grouped rows), else an
    older `<mode>.parquet` (every row)."""
    found: dict[str, str] = {}
    for path in index.storage.list(f"{DEDUP_DIR}/"):
        rest = path[len(DEDUP_DIR) + 1 :]
        mode, _, name = rest.partition("/")
        if name == "groups.parquet":
            found[mode] = path
        elif not name and rest.endswith(".parquet"):
            found.setdefault(rest[: -len(".parquet")], path)
    return [_dedup_section(index, page, mode, path) for mode, path in sorted(found.items())]


@dataclass
class DupGroups:
    """What a dedup section shows, read row group by row group (memory: one row group)."""

    rows: int = 0  # rows in the file
    grouped: int = 0  # of them in a group
    groups: int = 0  # group numbers seen (0..max)
    reasons: Counter | None = None
    sizes: Counter | None = None  # of the candidate groups (numbers below `shown`)
    members: dict[int, list[dict]] | None = None  # their first members in display order


def _member_order(row: dict) -> tuple:
    return (not row["kept"], -(row["similarity"] or 0.0), row["key"])


def read_dup_groups(storage: Storage, path: str, shown: int, per_group: int) -> DupGroups:
    """Counts over the file, and the first `per_group` members (kept first, then by
    similarity) of the groups numbered below `shown`: dedup numbers groups largest first, so
    these are the largest."""
    found = DupGroups(reasons=Counter(), sizes=Counter(), members={})
    with open_parquet(storage, path) as file:
        names = file.schema_arrow.names
        lacking = [c for c in DEDUP_COLUMNS if c not in names]
        if lacking:
            raise ValueError(
                f"{storage.url(path)} lacks column(s) {lacking} needed by the report "
                f"(it has {names}); rerun the verb that wrote it"
            )
        columns = DEDUP_COLUMNS + [c for c in ("kept_key",) if c in names]
        for g in range(file.num_row_groups):
            table = file.read_row_group(g, ["group", "reason"])
            group = pc.fill_null(table.column("group"), -1).to_numpy().astype(np.int64)
            found.rows += len(group)
            found.grouped += int((group >= 0).sum())
            found.groups = max(found.groups, int(group.max(initial=-1)) + 1)
            for item in pc.value_counts(table.column("reason")).to_pylist():
                found.reasons[item["values"]] += item["counts"]
            candidates = (group >= 0) & (group < shown)
            if not candidates.any():
                continue
            found.sizes.update(group[candidates].tolist())
            rows = file.read_row_group(g, columns).filter(pa.array(candidates)).to_pylist()
            for row in rows:
                found.members.setdefault(row["group"], []).append(row)
            for members in found.members.values():
                members.sort(key=_member_order)
                del members[per_group:]
    return found


def _dedup_section(index: Index, page: Page, mode: str, path: str) -> Section:
    config = page.config
    found = read_dup_groups(index.storage, path, config.dup_groups, config.dup_members)
    summary = _summary_json(index.storage, f"{DEDUP_DIR}/{mode}.summary.json")
    facts = dict(summary)
    examples = facts.get("examples") if path.endswith("/groups.parquet") else found.rows
    examples = examples if isinstance(examples, int) else found.rows
    if examples > found.rows:  # the groups file lists grouped rows only: the rest are unique
        found.reasons["unique"] += examples - found.rows
    groups = facts.get("groups") if isinstance(facts.get("groups"), int) else found.groups
    order = sorted(found.sizes, key=lambda g: (-found.sizes[g], g))[: config.dup_groups]
    for group in order:
        for row in found.members[group]:
            row["file"] = page.thumb(row["key"], row["shard"])
    section_id = f"dedup-{safe_name(mode)}"
    title = f"Duplicates: {mode}"

    def render() -> str:
        counts = [("examples", examples), ("duplicate groups", groups)]
        counts += [(f"reason: {r}", c) for r, c in sorted(found.reasons.items(), key=str)]
        parts = ["<h3>Counts</h3>", kv_table(counts)]
        if summary:
            parts += ["<h3>Summary</h3>", kv_table(summary)]
        parts.append(
            f"<h3>Largest groups (kept member outlined in green; {len(order)} of {groups})</h3>"
        )
        for group in order:
            parts.append(_dup_group(page, group, found.members[group], found.sizes[group]))
        return _wrap(section_id, title, "".join(parts))

    return Section(section_id, title, render)


def _dup_group(page: Page, group: int, rows: list[dict], size: int) -> str:
    """The group's first members (`rows`, in display order) of its `size`."""
    limit = page.config.dup_members
    tiles = "".join(
        page.tile(
            r["file"],
            r["key"],
            ["KEPT" if r["kept"] else str(r["reason"]), f"cos={num(r['similarity'], 4)}"],
            "kept" if r["kept"] else "",
        )
        for r in rows[:limit]
    )
    more = f"<p>+{size - limit} more</p>" if size > limit else ""
    block = labelled(f"group {group}: {size} examples", tiles)
    return f'<div class="dupgroup">{block}{more}</div>'


def _summary_json(storage: Storage, path: str) -> list[tuple[str, Any]]:
    """Scalar entries of a summary.json (nested values as compact JSON); [] if absent."""
    if not storage.exists(path):
        return []
    data = json.loads(storage.read_bytes(path))
    if not isinstance(data, dict):
        return []
    return [
        (k, v if isinstance(v, int | float | str | None) else json.dumps(v))
        for k, v in sorted(data.items())
    ]


# ----------------------------------------------------------------------------- groups


def group_sections(index: Index, page: Page) -> list[Section]:
    names = index.storage.list(f"{GROUPS_DIR}/")
    fields: dict[str, dict[str, str]] = {}
    for path in names:
        for kind in ("stats", "matrix"):
            suffix = f".{kind}.parquet"
            if path.endswith(suffix):
                field = path[len(GROUPS_DIR) + 1 : -len(suffix)]
                fields.setdefault(field, {})[kind] = path
    return [_group_section(index, page, field, paths) for field, paths in sorted(fields.items())]


def _group_section(index: Index, page: Page, field: str, paths: dict[str, str]) -> Section:
    limit = page.config.groups
    stats = None
    order: list[Any] = []
    plots: list[str] = []
    if "stats" in paths:
        stats = read_parquet(index.storage, paths["stats"], STATS_COLUMNS, None)
        by_size = [("count", "descending"), ("group", "ascending")]
        stats = stats.take(pc.sort_indices(stats, sort_keys=by_size))
        order = stats.column("group").to_pylist()[:limit]
        plots.append(page.plot(f"groups-{field}-stats", group_bars(stats.slice(0, limit))))
    if "matrix" in paths:
        matrix = read_parquet(index.storage, paths["matrix"], MATRIX_COLUMNS)
        if not order:
            labels = matrix.column("group_a").to_pylist() + matrix.column("group_b").to_pylist()
            order = sorted(set(labels), key=str)[:limit]
        plots.append(page.plot(f"groups-{field}-matrix", group_heatmaps(matrix, order)))
    section_id = f"groups-{safe_name(field)}"
    title = f"Groups: {field}"

    def render() -> str:
        parts = [f'<img class="plot" src="{esc(p)}" alt="{esc(title)}">' for p in plots]
        if stats is not None:
            parts.append(data_table(stats, limit))
        return _wrap(section_id, title, "".join(parts))

    return Section(section_id, title, render)


def group_bars(stats: pa.Table) -> Figure:
    """Mean self-influence and top share per group, side by side."""
    labels = [plot_label(g) for g in stats.column("group").to_pylist()]
    figure = Figure(figsize=(max(6, 0.35 * len(labels) + 3), 3.5))
    for i, (column, title) in enumerate(
        (
            ("self_influence_mean", "mean self-influence"),
            ("top_share", "share of the top self-influence"),
        )
    ):
        ax = figure.add_subplot(1, 2, i + 1)
        values = np.asarray(
            [np.nan if v is None else v for v in stats.column(column).to_pylist()], float
        )
        ax.bar(range(len(labels)), values, color="#4c72b0" if i == 0 else "#dd8452")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def group_heatmaps(matrix: pa.Table, order: list[Any]) -> Figure:
    """Mean influence and mean cosine between groups (rows: group_a, columns: group_b)."""
    position = {g: i for i, g in enumerate(order)}
    n = len(order)
    grids = {c: np.full((n, n), np.nan) for c in ("mean_influence", "mean_cosine")}
    for row in matrix.to_pylist():
        a, b = position.get(row["group_a"]), position.get(row["group_b"])
        if a is None or b is None:
            continue
        for column, grid in grids.items():
            grid[a, b] = np.nan if row[column] is None else row[column]
    labels = [plot_label(g) for g in order]
    figure = Figure(figsize=(max(8, 0.5 * n + 6), max(3.5, 0.25 * n + 2)))
    for i, (column, grid) in enumerate(grids.items()):
        ax = figure.add_subplot(1, 2, i + 1)
        bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound or 1.0)
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_title(column.replace("_", " "), fontsize=10)
        figure.colorbar(image, ax=ax, shrink=0.8)
    return figure
