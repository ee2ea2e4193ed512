"""Inputs as utilities have them: head-end column names, local timestamps, MDM channel exports, phase spellings.

Used by :mod:`phaseid_hpc.ingest` before any read reaches the store:

* :func:`column_map_help`: the message for a table that lacks required columns: the table's real header and
  the TOML (``column_map = { MeterID = "meter_id" }`` in ``[ingest]``, or ``meters_column_map``) that
  fixes it, with a best guess for common head-end names (``MeterID``, ``ReadTime``, ``Voltage``, ``XfmrID``, ...);
* :func:`guess_timestamp_format`: a strftime format that parses every example of a column that ISO 8601
  did not;
* :func:`pivot_channels`: an MDM interval export (one row per meter, channel, interval end, value,
  multiplier) to the contract's wide rows (``meter_id, timestamp, voltage_v[, kw][, kvar]``);
* :func:`normalise_phases`: phase spellings (``bc``, ``C-B``, OpenDSS ``2``, ``1.2``, ``123``) to the
  contract labels (``A, B, C, AB, BC, CA, ABC``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import contract
from .config import CHANNEL_QUANTITIES
from .errors import ContractError

__all__ = [
    "CHANNEL_COLUMNS",
    "ChannelPivot",
    "channel_columns",
    "column_map_help",
    "guess_column_map",
    "guess_timestamp_format",
    "normalise_phase",
    "normalise_phases",
    "pivot_channels",
]

#: Columns of the channel layout (``[ingest] readings_layout = "channel"``): required, then optional.
CHANNEL_COLUMNS: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("meter_id", "timestamp", "value"),
    ("channel", "uom", "multiplier"),
)

#: Header names (lower case, letters and digits only) that commonly mean a contract column.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "meter_id": ("meterid", "meter", "meterno", "meternumber", "meterserial", "serialnumber", "serialno",
                 "deviceid", "device", "endpointid", "endpoint", "mrid", "meterident"),
    "timestamp": ("timestamp", "readtime", "readingtime", "readtimestamp", "datetime", "time", "intervalend",
                  "intervalendtime", "endtime", "readdate", "readingdatetime", "readdatetime", "ts",
                  "intervaltime", "enddatetime", "intervalenddatetime"),
    "voltage_v": ("voltage", "voltagev", "volts", "volt", "v", "avgvoltage", "voltageavg", "vavg", "vrms"),
    "kw": ("kw", "demandkw", "kwdemand", "activepower", "realpower", "kwavg"),
    "kvar": ("kvar", "reactivepower", "kvardemand", "kvaravg"),
    "channel": ("channel", "channelid", "channelname", "channelno", "register", "measurement", "quantity",
                "readingtype"),
    "uom": ("uom", "unit", "units", "unitofmeasure", "unitofmeasurement"),
    "value": ("value", "readvalue", "reading", "intervalvalue", "val", "readingvalue", "amount"),
    "multiplier": ("multiplier", "mult", "scalefactor", "metermultiplier", "ctptmultiplier", "factor"),
    "feeder_id": ("feederid", "feeder", "circuit", "circuitid", "feedername", "feederno"),
    "transformer_id": ("transformerid", "transformer", "xfmr", "xfmrid", "xfmrno", "tx", "txid",
                       "servicetransformer", "transformerno", "trafo", "trafoid"),
    "phase": ("phase", "phasing", "phases", "phasecode", "connectedphase", "servicephase"),
    "service_type": ("servicetype", "service", "servicekind"),
    "nominal_v": ("nominalv", "nominalvoltage", "servicevoltage", "ratedvoltage"),
    "lat": ("lat", "latitude", "y"),
    "lon": ("lon", "long", "lng", "longitude", "x"),
}

#: strftime formats tried, in order, for timestamps that are not ISO 8601.
_TIMESTAMP_FORMATS: tuple[str, ...] = (
    "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %I:%M %p", "%m/%d/%Y %I:%M:%S %p",
    "%d/%m/%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%d.%m.%Y %H:%M:%S",
    "%Y/%m/%d %H:%M", "%Y/%m/%d %H:%M:%S", "%m-%d-%Y %H:%M", "%d-%m-%Y %H:%M",
    "%Y%m%d%H%M", "%Y%m%d %H:%M", "%Y%m%d%H%M%S", "%m/%d/%y %H:%M", "%d-%b-%Y %H:%M", "%d-%b-%Y %H:%M:%S",
)


def _norm(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def guess_column_map(header: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """Best-guess mapping of a table's header names onto contract column names.

    Parameters
    ----------
    header : sequence of str
        The table's column names as found.
    targets : sequence of str
        Contract names wanted (those missing); a name already in ``header`` is never guessed.

    Returns
    -------
    dict
        ``{header name: contract name}`` for each target whose synonyms match exactly one header name.
    """
    out: dict[str, str] = {}
    taken = set(header)
    for target in targets:
        if target in taken:
            continue
        cands = [h for h in header if h not in out and _norm(h) in _SYNONYMS.get(target, ())]
        if len(cands) == 1:
            out[cands[0]] = target
    return out


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _inline_table(pairs: Mapping[str, str]) -> str:
    """A TOML inline table (one line): ``{ MeterID = "meter_id", "Read Time" = "timestamp" }``."""
    return "{ " + ", ".join(f"{_toml_key(k)} = {json.dumps(v)}" for k, v in pairs.items()) + " }"


def column_map_help(
    what: str, header: Sequence[str], missing: Sequence[str], optional: Sequence[str], key: str
) -> str:
    """Error text for a table that lacks required columns: its real header and the TOML that fixes it.

    One line (the command line prints errors as one line): the TOML is an inline table for the ``[ingest]``
    table of the run config, ``column_map = { MeterID = "meter_id", ReadTime = "timestamp" }`` (the same
    as a ``[ingest.column_map]`` table with one line per name).

    Parameters
    ----------
    what : str
        The table, as named in the message (``"readings file 'x.csv'"``).
    header : sequence of str
        The table's column names as found (before any mapping).
    missing : sequence of str
        Required contract columns not found.
    optional : sequence of str
        Optional contract columns also worth guessing (``kw``, ``lat``, ...).
    key : str
        The ``[ingest]`` key that holds the mapping (``column_map`` or ``meters_column_map``).
    """
    guess = guess_column_map(header, list(missing) + [c for c in optional if c not in header])
    unguessed = [c for c in missing if c not in guess.values()]
    shown = list(header[:30]) + ([f"... ({len(header) - 30} more)"] if len(header) > 30 else [])
    text = f"{what}: missing required column(s) {list(missing)}; its header is {shown}. "
    if guess:
        text += f"Map the names in the run config (--config FILE), under [ingest]: {key} = {_inline_table(guess)}"
    else:
        text += f"Map the names in the run config (--config FILE), under [ingest]: {key} = {{ NAME = \"CONTRACT_NAME\" }}"
    if unguessed and guess:
        text += (f"; no header name looks like {unguessed}: add NAME = \"{unguessed[0]}\" for the column that holds "
                 "it")
    return text


def guess_timestamp_format(examples: Sequence[str]) -> list[str]:
    """strftime formats (of a fixed list of common ones) that parse every example; ``[]`` if none does."""
    vals = [str(e).strip() for e in examples if str(e).strip()]
    if not vals:
        return []
    found = []
    for fmt in _TIMESTAMP_FORMATS:
        parsed = pd.to_datetime(pd.Series(vals), format=fmt, errors="coerce")
        if parsed.notna().all():
            found.append(fmt)
    return found


# ------------------------------------------------------------------------------------------ phases
_PHASE_LETTERS = {"A": "A", "B": "B", "C": "C", "1": "A", "2": "B", "3": "C", "R": "A", "Y": "B"}
_PAIRS = {frozenset("AB"): "AB", frozenset("BC"): "BC", frozenset("AC"): "CA"}


def normalise_phase(label: object) -> str | None:
    """The contract label of one phase spelling, or ``None`` when it names no phase.

    Case, separators (``-``, ``.``, ``_``, ``/``, spaces), a ``PHASE`` prefix and a neutral (``N``, or
    OpenDSS node ``0``) are ignored; OpenDSS node numbers 1, 2, 3 are A, B, C; the order does not matter.

    Examples
    --------
    >>> [normalise_phase(x) for x in ("bc", "CB", "b-c", "2", "1.2", "123", "AN", "ac", "x")]
    ['BC', 'BC', 'BC', 'B', 'AB', 'ABC', 'A', 'CA', None]
    """
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return None
    text = re.sub(r"[\s\-._/,|:;]+", "", str(label).upper())
    text = re.sub(r"^PH(ASE)?", "", text)
    if not text:
        return None
    if text.endswith("N") and len(text) > 1:
        text = text[:-1]
    text = text.replace("0", "") if text != "0" else text
    try:
        letters = [_PHASE_LETTERS[ch] for ch in text]
    except KeyError:
        return None
    if len(set(letters)) != len(letters) or not 1 <= len(letters) <= 3:
        return None
    if len(letters) == 1:
        return letters[0]
    if len(letters) == 2:
        return _PAIRS[frozenset(letters)]
    return contract.THREE_PHASE


def normalise_phases(
    phase: pd.Series, meter_id: pd.Series, source: str
) -> tuple[pd.Series, dict[str, str]]:
    """Phase labels of a meter table in contract spelling.

    Parameters
    ----------
    phase, meter_id : Series, shape (n_meters,)
        The table's phase labels as found and the meters they belong to.
    source : str
        Name of the table in messages.

    Returns
    -------
    phase : Series of str, shape (n_meters,)
        Contract labels (``A, B, C, AB, BC, CA, ABC``).
    mapping : dict
        ``{label as found: contract label}`` for each label that changed (sorted by label).

    Raises
    ------
    ContractError
        Naming the rows and meters whose label names no phase (up to 10), and how many there are.
    """
    raw = phase.astype(object).where(phase.notna(), None)
    distinct = pd.unique(raw.astype(str).where(raw.notna(), ""))
    table = {lab: normalise_phase(lab if lab != "" else None) for lab in distinct}
    found = raw.astype(str).where(raw.notna(), "")
    out = found.map(table)
    bad = np.flatnonzero(out.isna().to_numpy())
    if len(bad):
        rows = "; ".join(f"row {i + 2}, meter {meter_id.iloc[i]!r}: {found.iloc[i]!r}" for i in bad[:10])
        raise ContractError(
            f"{source}: {len(bad)} phase label(s) name no phase ({rows}); expected one of "
            f"{list(contract.PHASE_LABELS)} or a spelling of one ('bc', 'C-B', OpenDSS '2', '1.2', '123')"
        )
    mapping = {k: v for k, v in sorted(table.items()) if v is not None and k != v}
    return out.astype(object), mapping


# ------------------------------------------------------------------------------------------ channels
#: quantity -> (contract column, factor to its unit, energy per interval)
_QUANTITY: dict[str, tuple[str, float, bool]] = {
    "voltage_v": ("voltage_v", 1.0, False),
    "kv": ("voltage_v", 1000.0, False),
    "kw": ("kw", 1.0, False),
    "w": ("kw", 1e-3, False),
    "kvar": ("kvar", 1.0, False),
    "var": ("kvar", 1e-3, False),
    "kwh": ("kw", 1.0, True),
    "wh": ("kw", 1e-3, True),
    "kvarh": ("kvar", 1.0, True),
    "varh": ("kvar", 1e-3, True),
}
assert set(_QUANTITY) == set(CHANNEL_QUANTITIES)


def channel_columns(channel_map: Mapping[str, str]) -> list[str]:
    """Wide columns a channel export gives with ``channel_map``: ``voltage_v`` and the mapped ``kw``, ``kvar``."""
    mapped = {_QUANTITY[q][0] for q in channel_map.values()}
    return ["voltage_v"] + [c for c in contract.READINGS_OPTIONAL if c in mapped]


#: Wide columns of the channel layout, in output order.
_COLUMNS: tuple[str, ...] = ("voltage_v", "kw", "kvar")


@dataclass
class ChannelPivot:
    """The wide rows of one channel export and what the pivot did."""

    #: ``meter_id, timestamp`` (as in the file) and ``voltage_v`` [V], ``kw`` [kW], ``kvar`` [kvar] where mapped.
    wide: pd.DataFrame
    #: Rows of the export read.
    rows_read: int = 0
    #: Rows identical to another (same meter, channel, interval end and value) dropped.
    duplicates_identical: int = 0
    #: Rows of ignored channels, by channel.
    ignored: dict[str, int] = field(default_factory=dict)
    #: Extra wide rows made for conflicting rows (same meter, quantity and interval end, other value); the
    #: ingest quarantines every row of such a group as ``conflicting_duplicate``.
    conflicts: int = 0
    #: Interval length used to turn energy into demand [s] (``None``: no energy channel).
    interval_s: int | None = None
    #: ``{quantity column: channels feeding it}``.
    sources: dict[str, list[str]] = field(default_factory=dict)

    def note(self, name: str) -> str:
        """One line for the ingest report."""
        parts = [f"{name}: channel layout, {self.rows_read:,} rows -> {len(self.wide):,} interval rows"]
        feeds = ", ".join(f"{c} <- {src}" for c, src in self.sources.items())
        if feeds:
            parts.append(feeds + " (x multiplier)")
        if self.interval_s:
            parts.append(f"energy per {self.interval_s} s interval divided by {self.interval_s / 3600:g} h")
        if self.duplicates_identical:
            parts.append(f"{self.duplicates_identical:,} identical duplicate rows dropped")
        if self.conflicts:
            parts.append(f"{self.conflicts:,} conflicting duplicate rows (quarantined as conflicting_duplicate)")
        if self.ignored:
            parts.append(f"ignored channels (rows): {self.ignored}")
        return "; ".join(parts)


def _dominant_spacing_s(meter: pd.Series, ts_ns: np.ndarray) -> int | None:
    ok = ts_ns != np.iinfo(np.int64).min
    pairs = pd.DataFrame({"m": meter.to_numpy()[ok], "t": ts_ns[ok]}).drop_duplicates().sort_values(["m", "t"])
    d = pairs.groupby("m", sort=False)["t"].diff().dropna().to_numpy()
    d = d[d > 0]
    if not len(d):
        return None
    vals, cnt = np.unique(d, return_counts=True)
    return int(vals[np.argmax(cnt)] // 10**9)


def _resolve_channels(
    df: pd.DataFrame, channel_map: Mapping[str, str], ignore: Sequence[str], source: str
) -> tuple[np.ndarray, list[str | None], np.ndarray, np.ndarray, np.ndarray]:
    """Step 1 of :func:`pivot_channels`: each distinct (channel, unit) pair's quantity, or ignored.

    Returns
    -------
    codes : ndarray of int, shape (n_rows,)
        Each row's pair.
    qty : list, length n_pairs
        The pair's quantity (``None``: ignored).
    names : ndarray of str, shape (n_pairs,)
        How the report names the pair (``"1 (KWH)"``, or whichever of the two the export has).
    skip : ndarray of bool, shape (n_pairs,)
        The pair is listed in ``ignore``.
    rows : ndarray of int, shape (n_pairs,)
        Rows of each pair.

    Raises
    ------
    ContractError
        Pairs neither mapped nor ignored, with their row counts and the TOML to add.
    """
    ch_codes, ch_names = _labels(df, "channel")
    u_codes, u_names = _labels(df, "uom")
    p_codes, pairs = pd.factorize((ch_codes + 1) * (len(u_names) + 1) + (u_codes + 1))
    chans = [ch_names[c // (len(u_names) + 1) - 1] if c // (len(u_names) + 1) else None for c in pairs]
    units = [u_names[c % (len(u_names) + 1) - 1] if c % (len(u_names) + 1) else None for c in pairs]
    qty = [channel_map.get(c) if c in channel_map else channel_map.get(u) for c, u in zip(chans, units)]
    skip = np.array([q is None and (c in ignore or u in ignore) for q, c, u in zip(qty, chans, units)], bool)
    names = np.array([f"{c} ({u})" if c is not None and u is not None else str(c if c is not None else u)
                      for c, u in zip(chans, units)], dtype=object)
    rows_of = np.bincount(p_codes, minlength=len(pairs))
    unknown = np.flatnonzero(np.array([q is None for q in qty], bool) & ~skip)
    if len(unknown):
        order = sorted(unknown, key=lambda i: (str(chans[i] or ""), str(units[i] or "")))[:10]
        listed = "; ".join(f"channel {chans[i] or ''!r} uom {units[i] or ''!r}: {rows_of[i]} rows" for i in order)
        guesses = []
        for i in order:
            g = _guess_quantity(str(units[i])) or _guess_quantity(str(chans[i]))
            guesses.append(f'{_toml_key(str(chans[i] or units[i]))} = "{g or "QUANTITY"}"')
        raise ContractError(
            f"{source}: {int(rows_of[unknown].sum())} rows of channels that [ingest] channel_map does not name "
            f"({listed}). Map each channel (or unit) to a quantity, or list it in [ingest] channel_ignore; e.g. "
            f"under [ingest]: channel_map = {{ {', '.join(guesses)} }}" + (f" (QUANTITY: one of {list(CHANNEL_QUANTITIES)})"
                                                                          if "QUANTITY" in " ".join(guesses) else "")
        )
    return p_codes, qty, names, skip, rows_of


def pivot_channels(
    df: pd.DataFrame,
    channel_map: Mapping[str, str],
    ignore: Sequence[str],
    source: str,
    *,
    parse_ns: Callable[[pd.Series], np.ndarray],
    interval_s: int = 0,
) -> ChannelPivot:
    """Pivot an MDM interval export (long, one row per meter, channel and interval end) to wide rows.

    Parameters
    ----------
    df : DataFrame
        Columns ``meter_id, timestamp, value`` and ``channel`` and/or ``uom``, optionally ``multiplier``
        (contract names, after ``[ingest] column_map``), as text.
    channel_map : mapping
        Channel name or unit -> quantity (:data:`~phaseid_hpc.config.CHANNEL_QUANTITIES`).
    ignore : sequence of str
        Channel names or units skipped on purpose (counted).
    source : str
        The file, in messages.
    parse_ns : callable
        ``parse_ns(Series) -> ndarray of int64`` [ns since epoch, UTC; int64 min where unparsable]: the
        ingest's timestamp parser (format and time zone applied), used for the interval length.
    interval_s : int
        Interval length [s] for energy channels; ``0``: the dominant spacing of the interval ends.

    Returns
    -------
    ChannelPivot

    Raises
    ------
    ContractError
        A channel (and its unit) that ``channel_map`` does not name and ``ignore`` does not list (the
        message lists them with row counts and the TOML to add); an energy channel whose interval length
        cannot be found.

    Notes
    -----
    ``value x multiplier`` (missing multiplier: 1) gives the quantity in its unit; ``kWh`` per interval is
    turned into mean demand ``kW = kWh / (interval_s / 3600)`` (likewise kvarh, Wh, varh). Rows are keyed on
    the interval end as written, so every channel of one interval lands on one wide row. Rows equal in
    meter, channel, interval end and value are dropped (counted); rows equal in meter, quantity and interval
    end but not in value each give a wide row, so the ingest quarantines the whole group as
    ``conflicting_duplicate``. Missing values stay missing (a wide row without voltage is quarantined as
    ``invalid_value``).
    """
    n = len(df)
    # Step 1: each distinct (channel, unit) pair resolved to a quantity, or ignored (else an error)
    pc_all, qty, names, skip, rows_of = _resolve_channels(df, channel_map, ignore, source)
    ignored = {str(names[i]): int(rows_of[i]) for i in sorted(np.flatnonzero(skip), key=lambda i: names[i])}
    # Step 2: values in the contract units (multiplier, kV, W, energy per interval)
    keep = ~skip[pc_all]
    d, pc = df.loc[keep], pc_all[keep]
    pair_col = np.array([_COLUMNS.index(_QUANTITY[q][0]) if q else -1 for q in qty], np.int8)
    pair_scale = np.array([_QUANTITY[q][1] if q else np.nan for q in qty])
    pair_energy = np.array([bool(q) and _QUANTITY[q][2] for q in qty], bool)
    value = pd.to_numeric(d["value"], errors="coerce").to_numpy(np.float64)
    mult = np.ones(len(d))
    if "multiplier" in d.columns:
        m_codes, m_uniq = pd.factorize(d["multiplier"])
        m_vals = pd.to_numeric(pd.Series(m_uniq, dtype=object), errors="coerce").fillna(1.0).to_numpy(np.float64)
        mult = np.append(m_vals, 1.0)[m_codes]  # a missing multiplier (code -1) is 1
    scale = pair_scale[pc]
    used_interval = None
    if pair_energy[pc].any():
        used_interval = int(interval_s) if interval_s > 0 else _dominant_spacing_s(
            d["meter_id"], np.asarray(parse_ns(d["timestamp"])))
        if not used_interval:
            raise ContractError(
                f"{source}: energy channels need the interval length and the interval ends do not show it "
                "(fewer than 2 per meter); set [ingest] interval_s"
            )
        scale = np.where(pair_energy[pc], scale * 3600.0 / used_interval, scale)
    # Step 3: one wide row per (meter, interval end as written); identical rows dropped, conflicts kept apart
    out, long, n_dup, n_conflicts = _wide_rows(d["meter_id"], d["timestamp"], pair_col[pc], pc, value * mult * scale)
    sources: dict[str, list[str]] = {}
    used = np.unique(long["col"].to_numpy(np.int64) * len(qty) + long["chan"].to_numpy(np.int64))
    for j, p in sorted(zip(used // len(qty), used % len(qty)), key=lambda x: (x[0], names[x[1]])):
        sources.setdefault(_COLUMNS[j], []).append(str(names[p]))
    return ChannelPivot(
        wide=out, rows_read=n, duplicates_identical=n_dup, ignored=ignored,
        conflicts=n_conflicts, interval_s=used_interval, sources=sources,
    )


def _wide_rows(
    meter_id: pd.Series, timestamp: pd.Series, col: np.ndarray, chan: np.ndarray, val: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    """Step 3 of :func:`pivot_channels`: one wide row per meter and interval end (as written).

    Parameters
    ----------
    meter_id, timestamp : Series, shape (n_rows,)
        Of the kept rows.
    col, chan : ndarray of int, shape (n_rows,)
        Index into ``_COLUMNS`` and the (channel, unit) pair of each row.
    val : ndarray of float, shape (n_rows,)
        Values in the contract units.

    Returns
    -------
    wide : DataFrame
        ``meter_id, timestamp, voltage_v`` and ``kw``, ``kvar`` where given.
    long : DataFrame
        The rows after identical duplicates are dropped (codes ``m, t, col, chan`` and ``val``).
    duplicates, conflicts : int
        Rows dropped as identical; extra wide rows made for conflicting values.
    """
    mi, meters = pd.factorize(meter_id, use_na_sentinel=False)
    ti, stamps = pd.factorize(timestamp, use_na_sentinel=False)
    long = pd.DataFrame({"m": mi, "t": ti, "col": col, "chan": chan, "val": val})
    dup = long.duplicated(["m", "t", "col", "chan", "val"], keep="first").to_numpy()
    long = long.loc[~dup].reset_index(drop=True)
    k = long.groupby(["m", "t", "col"], sort=False).cumcount().to_numpy()
    wide = long.loc[k == 0].pivot(index=["m", "t"], columns="col", values="val")
    extra = long.loc[k > 0]
    if len(extra):  # a copy of the interval's row with the other value: the ingest sees the conflict
        base = wide.loc[pd.MultiIndex.from_arrays([extra["m"], extra["t"]])]
        vals = base.to_numpy(copy=True)
        vals[np.arange(len(extra)), wide.columns.get_indexer(extra["col"])] = extra["val"].to_numpy()
        wide = pd.concat([wide, pd.DataFrame(vals, index=base.index, columns=wide.columns)])
    present = set(wide.columns)
    out = pd.DataFrame({
        "meter_id": np.asarray(meters, dtype=object)[wide.index.get_level_values("m")],
        "timestamp": pd.Index(stamps)[wide.index.get_level_values("t")],  # as read: text or datetimes
    })
    for j, c in enumerate(_COLUMNS):
        if j in present:
            out[c] = wide[j].to_numpy()
        elif c == "voltage_v":
            out[c] = np.nan
    return out, long, int(dup.sum()), int((k > 0).sum())


def _labels(df: pd.DataFrame, name: str) -> tuple[np.ndarray, list[str]]:
    """Codes (-1: missing or no such column) and distinct values, as stripped text, of a label column.

    Channel numbers from a Parquet integer column become text, so they match TOML's string keys.
    """
    if name not in df.columns:
        return np.full(len(df), -1, np.int64), []
    codes, uniq = pd.factorize(df[name], use_na_sentinel=True)
    return codes.astype(np.int64), [str(u).strip() for u in uniq]


def _guess_quantity(text: str) -> str | None:
    t = _norm(text)
    for q, keys in (("voltage_v", ("v", "volt", "volts", "voltage", "vrms")), ("kwh", ("kwh",)),
                    ("kvarh", ("kvarh",)), ("kw", ("kw",)), ("kvar", ("kvar",)), ("wh", ("wh",)),
                    ("varh", ("varh",))):
        if t in keys:
            return q
    return None
