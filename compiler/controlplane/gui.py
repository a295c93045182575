"""The dashboard at ``/gui``: server-rendered HTML, refreshed by a little vanilla JavaScript.

The page is complete without JavaScript. The script polls ``/api/v1/dashboard/fragments`` every
two seconds, which returns each section rendered by the same functions as the page, and swaps
them in: one renderer, no front-end build step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import Any

from compiler.controlplane.status_table import format_text, lag_text

__all__ = ["FAVICON_SVG", "SECTIONS", "render_page", "render_sections"]

FAVICON_SVG = (
    "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
    "<rect width='16' height='16' rx='3' fill='#1d2b3a'/>"
    "<g stroke='#8bbc21' stroke-width='1.5'><path d='M4 4L12 12M12 4L4 12M4 4L12 4M4 12L12 12'/></g>"
    "<g fill='#2f7ed8'><circle cx='4' cy='4' r='2'/><circle cx='12' cy='4' r='2'/>"
    "<circle cx='4' cy='12' r='2'/><circle cx='12' cy='12' r='2'/></g></svg>"
)
"""The dashboard's icon (served at ``/favicon.ico``): a little mesh."""


def _e(v: Any) -> str:
    return escape("" if v is None else str(v))


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0.0, now - ts)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    if not rows:
        return '<p class="empty">none</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _badge(text: str) -> str:
    cls = {
        "SYNCED": "ok",
        "Online": "ok",
        "STALE": "bad",
        "Offline": "bad",
        "NOT SENT": "warn",
        "error": "bad",
        "warning": "warn",
        "Succeeded": "ok",
        "Progressing": "ok",
        "RolledBack": "bad",
        "Aborted": "bad",
        "Paused": "warn",
        "Inconclusive": "warn",
        "Waiting": "warn",
    }.get(text, "")
    return f'<span class="badge {cls}">{_e(text)}</span>'


def _overview(d: dict[str, Any]) -> str:
    o = d["overview"]
    now = o["now"]
    last = d["diagnostics"]["last"]
    compile_state = "-" if last is None else ("ok" if last["ok"] else "FAILED")
    cards = [
        ("Meshes", len(o["meshes"])),
        ("Services", len(d["services"])),
        ("Data plane proxies", f"{o['online']} online / {o['dataplanes']}"),
        ("SYNCED", f"{o['synced']} / {o['dataplanes']}"),
        ("Policies", o["policies"]),
        ("Last compile", compile_state),
    ]
    html = '<div class="cards">' + "".join(
        f'<div class="card"><div class="n">{_e(v)}</div><div class="l">{_e(k)}</div></div>' for k, v in cards
    )
    html += "</div>"
    rel = o["release"]
    html += (
        f'<p class="meta">Release <code title="{_e(rel)}">{_e((rel or "none")[:12])}</code>'
        f"{' at commit <code>' + _e(o['commit'][:12]) + '</code>' if o['commit'] else ''}"
        f" applied {_e(_ago(o['release_applied_at'], now))} &middot; source {_e(o['source'])}"
        f" &middot; updated {_e(time.strftime('%H:%M:%S', time.localtime(now)))}</p>"
    )
    rows = [[_e(m["name"]), _e(m["services"]), _e(f"{m['online']} / {m['dataplanes']}")] for m in o["meshes"]]
    return html + _table(["Mesh", "Services", "Proxies online"], rows)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%".replace(".0%", "%")


def _bar(parts: list[tuple[str, float]]) -> str:
    colors = ["#2f7ed8", "#f28f43", "#8bbc21", "#910000", "#1aadce", "#492970"]
    segs = "".join(
        f'<span style="width:{max(share * 100, 0.5):.2f}%;background:{colors[i % len(colors)]}" '
        f'title="{_e(name)} {_pct(share)}"></span>'
        for i, (name, share) in enumerate(parts)
    )
    return f'<div class="bar">{segs}</div>'


def _subset_name(subset: str) -> str:
    return "all instances" if subset in ("*", "") else subset


def _traffic(d: dict[str, Any]) -> str:
    t = d["traffic"]
    rows = []
    for r in t["routes"]:
        if r["kind"] == "gateway":
            src = f"{r['source']} {r.get('listener', '')} {r.get('path', '')}"
        else:
            src = "any source without a TrafficRoute" if r["source"] == "*" else r["source"]
        conf = [
            (_subset_name(s["subset"]) if r["kind"] != "gateway" else s["service"], s["share"])
            for s in r["split"]
        ]
        conf_txt = " &nbsp; ".join(f'<span class="split">{_e(n)} <b>{_pct(x)}</b></span>' for n, x in conf)
        obs = r.get("observed") or {}
        subs = obs.get("subsets") or {}
        if subs:
            obs_parts = [(_subset_name(k), v["share"]) for k, v in subs.items()]
            obs_txt = " &nbsp; ".join(
                f'<span class="split">{_e(_subset_name(k))} <b>{_pct(v["share"])}</b> '
                f"({v['requests']})</span>"
                for k, v in subs.items()
            )
            obs_html = _bar(obs_parts) + obs_txt
        else:
            obs_html = '<span class="empty">no traffic seen</span>'
        rows.append(
            [
                _e(r["kind"]),
                _e(src),
                f"<b>{_e(r['destination'])}</b>",
                _bar(conf) + conf_txt,
                obs_html,
            ]
        )
    window, since = t.get("window_s") or 0, t.get("since")
    if since is None:
        note = "observed: collecting since the current release began (two scrapes needed)"
    else:
        at = time.strftime("%H:%M:%S", time.localtime(since))
        note = f"observed over {window:.0f}s since {at}, all of it under the current release"
    return (
        _table(["Kind", "Source", "Destination", "Configured split", "Observed split"], rows, "traffic")
        + f'<p class="meta">{_e(note)}; counts of 2xx responses from the data planes\' metrics.</p>'
    )


def _services(d: dict[str, Any]) -> str:
    rows = []
    for s in d["services"]:
        subsets = ", ".join(
            f"{_e(','.join(f'{k}={v}' for k, v in sub['tags'].items()))} ({sub['online']}/{sub['instances']})"
            for sub in s["subsets"]
        )
        rows.append(
            [
                f"<b>{_e(s['service'])}</b>"
                + (' <span class="badge">gateway</span>' if s["gateway"] else ""),
                _e(s["mesh"]),
                _e(f"{s['port']}/{s['protocol']}"),
                subsets or "-",
                _e(f"{s['online']} / {s['instances']}"),
                f"<code>{_e((s['digest'] or '-')[:12])}</code>",
            ]
        )
    return _table(
        ["Service", "Mesh", "Port", "Subsets (online/instances)", "Instances online", "Bundle"], rows
    )


def _dataplanes(d: dict[str, Any]) -> str:
    now = d["overview"]["now"]
    rows = []
    for r in d["dataplanes"]:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(r["tags"].items()))
        slots = r.get("slots") or {}
        slot_txt = " ".join(
            f'<span class="slot" title="{_e(k)}: {_e(v.get("acked") or "")}">'
            f"{_e(k)}:{_badge(v['status'])}</span>"
            for k, v in slots.items()
        )
        digest = (r["digest"] or {}).get("service") or (r["digest"] or {}).get("mesh") or "-"
        rows.append(
            [
                f"<b>{_e(r['instance'])}</b>",
                _e(r["service"]),
                _e(tags or "-"),
                _e(r["kind"]),
                _badge(r["state"]),
                _badge(r["status"]) + " " + slot_txt,
                _e(format_text(r)),
                f"<code>{_e(digest[:12])}</code>",
                _e(_ago(r["last_seen"], now)),
                _e(_ago(r["last_ack_at"], now)),
                _e(lag_text(r)),
                _e(r["last_nack"] or r["last_error"] or "-"),
                _e(r.get("replica") or "-"),
            ]
        )
    return _table(
        [
            "Proxy",
            "Service",
            "Tags",
            "Kind",
            "State",
            "Sync",
            "Format",
            "Digest",
            "Last seen",
            "Last ACK",
            "Lag",
            "Last NACK / error",
            "Replica",
        ],
        rows,
        "dataplanes",
    )


def _replicas(d: dict[str, Any]) -> str:
    """The control plane replicas sharing the store, which one leads, its fencing token."""
    cp = d.get("controlplane") or {}
    head = (
        f'<p class="meta">Store <code>{_e(cp.get("store", "-"))}</code> &middot; leader '
        f"<b>{_e(cp.get('leader') or 'none')}</b> (fencing token {_e(cp.get('leader_token'))}) &middot; "
        f"this replica <code>{_e(cp.get('replica', '-'))}</code></p>"
    )
    rows = [
        [
            f"<b>{_e(r['id'])}</b>",
            _e(r["url"]),
            _badge("leader" if r.get("leader") else ("Online" if r.get("alive") else "Offline")),
            _e(r.get("dataplanes", 0)),
            _e(f"{r.get('last_seen_ago_s', 0):.1f}s ago"),
        ]
        for r in cp.get("replicas", [])
    ]
    return head + _table(["Replica", "URL", "Role", "Data planes", "Last seen"], rows, "replicas")


def _policies(d: dict[str, Any]) -> str:
    rows = [
        [
            _e(p["kind"]),
            f"<b>{_e(p['name'])}</b>",
            f"<code>{_e(p['file'])}:{_e(p['line'])}</code>",
            _e(", ".join(p["bundles"])),
        ]
        for p in d["policies"]
    ]
    return _table(["Kind", "Name", "Source", "Shapes bundles"], rows)


def _diagnostics(d: dict[str, Any]) -> str:
    last = d["diagnostics"]["last"]
    if last is None:
        return '<p class="empty">no compile yet</p>'
    now = d["overview"]["now"]
    head = (
        f'<p class="meta">Last compile {_e(_ago(last["at"], now))} ({_e(last["trigger"])}): '
        f"{'<b class=ok>ok</b>' if last['ok'] else '<b class=bad>failed: the current release is kept</b>'}"
        f" &middot; {_e(last['summary'].get('errors', 0))} error(s), "
        f"{_e(last['summary'].get('warnings', 0))} warning(s)</p>"
    )
    if last.get("error"):
        head += f'<p class="bad">{_e(last["error"])}</p>'
    rows = [
        [
            _badge(x["severity"]),
            _e(x["code"]),
            f"<code>{_e(x['file'])}:{_e(x['line'])}:{_e(x['column'])}</code>",
            _e(x["message"]),
        ]
        for x in last["diagnostics"]
    ]
    return head + (_table(["Severity", "Code", "Where", "Message"], rows, "diags") if rows else "")


def _canaries(d: dict[str, Any]) -> str:
    """Each Canary live: its phase, the weights data planes run, the steps with the current one
    marked, the last analysis run and the latest events."""
    from compiler.canary import split_text, step_text

    rows = []
    for c in d.get("canaries") or []:
        ended = c["phase"] in ("Succeeded", "RolledBack", "Aborted")
        steps = "".join(
            f'<li class="{"now" if i == c.get("step") and not ended else ""}">{_e(step_text(s))}</li>'
            for i, s in enumerate(c["steps"])
        )
        run = c.get("last_run") or {}
        events = "<br>".join(
            _e(f"step {e['step'] + 1}: {e['message']}") for e in list(reversed(c.get("history") or []))[:4]
        )
        rows.append(
            [
                f"<b>{_e(c['key'])}</b><br><span class=meta>{_e(c['route']['kind'])} "
                f"{_e(c['route']['name'])} &rarr; {_e(c['destination'])}</span>",
                _badge(c["phase"] or "-"),
                f'<span class="split">{_e(split_text(c["split"]))}</span>'
                + ("" if c["overridden"] else " <span class=meta>(as in Git)</span>"),
                f'<ol class="steps">{steps}</ol>',
                _e(f"{run.get('result', '-')}: {run.get('reason', '')}") if run else "-",
                f'<span class="meta">{events}</span>',
            ]
        )
    if not rows:
        return '<p class="empty">no Canary in the current release</p>'
    return _table(["Canary", "Phase", "Weights now", "Steps", "Last analysis", "Events"], rows, "canaries")


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "overview": ("Mesh overview", _overview),
    "traffic": ("Traffic split per route", _traffic),
    "canaries": ("Canaries", _canaries),
    "services": ("Services", _services),
    "dataplanes": ("Data plane proxies", _dataplanes),
    "replicas": ("Control plane replicas", _replicas),
    "policies": ("Policies of the current release", _policies),
    "diagnostics": ("Last compile diagnostics", _diagnostics),
}


def render_sections(d: dict[str, Any]) -> dict[str, str]:
    return {k: fn(d) for k, (_, fn) in SECTIONS.items()}


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f5f6f8;color:#222}
header{background:#1d2b3a;color:#fff;padding:10px 20px;display:flex;align-items:center;gap:16px}
header h1{font-size:18px;margin:0} header .live{font-size:12px;opacity:.8}
main{padding:12px 20px;max-width:1400px} section{background:#fff;border-radius:6px;padding:10px 16px;
margin:12px 0;box-shadow:0 1px 2px rgba(0,0,0,.08)} h2{font-size:15px;margin:4px 0 10px}
table{border-collapse:collapse;width:100%;font-size:13px} th,td{text-align:left;padding:5px 8px;
border-bottom:1px solid #eee;vertical-align:top} th{background:#fafafa;font-weight:600}
code{font-size:12px;background:#f0f0f0;padding:0 3px;border-radius:3px}
.badge{display:inline-block;white-space:nowrap;padding:1px 6px;border-radius:9px;font-size:11px;
background:#ddd}
.badge.ok{background:#d4f4dd;color:#17602c}.badge.bad{background:#fbd5d5;color:#8a1414}
.badge.warn{background:#fff1c2;color:#7a5a00}.ok{color:#17602c}.bad{color:#8a1414}
.cards{display:flex;gap:10px;flex-wrap:wrap}.card{border:1px solid #e3e3e3;border-radius:6px;
padding:8px 14px;min-width:120px}.card .n{font-size:20px;font-weight:600}.card .l{font-size:12px;color:#666}
.meta{font-size:12px;color:#555}.empty{color:#888;font-style:italic}
.bar{display:flex;height:10px;width:240px;border-radius:3px;overflow:hidden;background:#eee;margin:2px 0 4px}
.bar span{display:block;height:100%}.split{white-space:nowrap;font-size:12px}
.slot{font-size:11px;margin-left:4px}
ol.steps{margin:0;padding-left:18px;font-size:12px} ol.steps li.now{font-weight:700;color:#1d4ed8}
"""

_JS = """
(function(){
  var ok = true;
  function tick(){
    fetch('/api/v1/dashboard/fragments', {credentials:'same-origin'}).then(function(r){
      if(!r.ok) throw new Error('HTTP '+r.status); return r.json();
    }).then(function(parts){
      Object.keys(parts).forEach(function(k){
        var el = document.getElementById('sec-'+k); if(el) el.innerHTML = parts[k];
      });
      document.getElementById('live').textContent = 'live, refreshed ' + new Date().toLocaleTimeString();
      var n = Number(document.body.getAttribute('data-refreshes') || 0);
      document.body.setAttribute('data-refreshes', String(n + 1));
    }).catch(function(e){
      document.getElementById('live').textContent = 'control plane unreachable: ' + e.message;
    }).finally(function(){ setTimeout(tick, 2000); });
  }
  setTimeout(tick, 2000);
})();
"""


def render_page(d: dict[str, Any]) -> str:
    parts = render_sections(d)
    body = "".join(
        f'<section><h2>{_e(title)}</h2><div id="sec-{k}">{parts[k]}</div></section>'
        for k, (title, _) in SECTIONS.items()
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        "<link rel=icon href='/favicon.ico' type='image/svg+xml'>"
        f"<title>meshc control plane</title><style>{_CSS}</style></head>"
        '<body data-refreshes="0"><header><h1>meshc control plane</h1>'
        '<span class="live" id="live">live</span></header>'
        f"<main>{body}</main><script>{_JS}</script></body></html>"
    )
