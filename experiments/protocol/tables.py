"""``tables.md``: the protocol's results as markdown, from ``protocol.json``'s document."""

from __future__ import annotations

from typing import Any

from experiments.protocol import curves, report

_RHO_GRIDS = {"xsam": ("xsam",), "xsam_fixed": ("xsam_fixed", "sam")}


def _single(section: dict[str, Any]) -> list[str]:
  return [
    *report.method_table(section["tests"]),
    "",
    "Paired over the test seeds:",
    "",
    *report.comparison_table(section["comparisons"]),
  ]


def _rho(entries: list[dict[str, Any]]) -> list[str]:
  lines = [
    (
      "| rho | XSAM rho_max / rho | fixed alpha | SAM val (%) | SAM test (%) | fixed alpha test (%) | XSAM test (%) "
      "| XSAM - SAM [95% CI] | XSAM - fixed [95% CI] | XSAM alpha mean (at 2.0) |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for e in entries:
    sel, t = e["selected"], e["tests"]
    comps = {(c["a"], c["b"]): c for c in e["comparisons"]}
    fixed = sel["xsam_fixed"]["setting"]
    alpha = fixed.get("alpha", 1.0) if fixed["method"] == "xsam_fixed" else 1.0
    a = t["xsam"].get("alpha")
    lines.append(
      f"| {e['rho']:g} | {sel['xsam']['setting']['rho_max'] / e['rho']:g} | {alpha:g} | "
      f"{100 * sel['sam']['mean']:.2f} | {report.mean_std(t['sam']['summary'])} | "
      f"{report.mean_std(t['xsam_fixed']['summary'])} | "
      f"{report.mean_std(t['xsam']['summary'])} | {report.fmt_ci(comps[('xsam', 'sam')])} | "
      f"{report.fmt_ci(comps[('xsam', 'xsam_fixed')])} | "
      + (f"{a['mean']:.2f} ({100 * a['at_2']:.0f}%) |" if a else " |")
    )
  return lines


def _multistep(ms: dict[str, Any], ks: list[int], methods: list[str]) -> list[str]:
  lines = ["| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
  for m in methods:
    cells = [report.mean_std(ms["tests"][f"{m}@K={k}"]["summary"]) for k in ks]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += ["", "Each method against SAM at the same K (paired):", ""]
  lines += ["| K | a - SAM | mean diff (pp) [95% CI] | wins / ties / losses | verdict |", "|---|---|---|---|---|"]
  lines += [
    f"| {c['K']} | {c['a']} | {report.fmt_ci(c)} | {c['wins']} / {c['ties']} / {c['losses']} | {report.verdict(c)} |"
    for c in ms["vs_sam"]
  ]
  lines += ["", f"Each method against itself at K={ks[0]} (paired):", ""]
  lines += ["| method | K | mean diff (pp) [95% CI] | wins / ties / losses | verdict |", "|---|---|---|---|---|"]
  lines += [
    f"| {c['method']} | {c['a']} - {c['b']} | {report.fmt_ci(c)} | {c['wins']} / {c['ties']} / {c['losses']} | "
    f"{report.verdict(c)} |"
    for c in ms["vs_first_k"]
  ]
  return lines


def _cost(doc: dict[str, Any]) -> list[str]:
  total = f"Wall time {doc['wall_time_s']:.0f} s; runs trained by this invocation {doc['runs_trained']} "
  lines = [total + f"(stored in all: {doc['runs_stored']}).", ""]
  lines += ["| stage | wall time (s) | runs trained |", "|---|---|---|"]
  lines += [f"| {k} | {v:.0f} | {doc['stage_runs_trained'][k]} |" for k, v in doc["stage_wall_time_s"].items()]
  vm = doc.get("vmap")
  if vm:
    lines += ["", f"vmap over seeds ({vm['n_runs']} runs, {vm['epochs']} epochs): {vm['verdict']}.", ""]
    lines += ["| method | loop (s/run) | vmap (s/run) | loop / vmap |", "|---|---|---|---|"]
    lines += [
      f"| {m} | {v['loop_s_per_run']:.2f} | {v['vmap_s_per_run']:.2f} | {v['speedup']:.2f} |"
      for m, v in vm["methods"].items()
    ]
    lines += [
      "",
      (
        f"XSAM / SAM time: {vm['xsam_over_sam']['loop']:.2f} looped, {vm['xsam_over_sam']['vmap']:.2f} batched; "
        f"XSAM's probe `cond` kept under vmap: {vm['xsam_cond_kept_under_vmap']}."
      ),
    ]
  return lines


def markdown(doc: dict[str, Any]) -> str:
  """The whole ``tables.md``."""
  m, c = doc["machine"], doc["config"]
  versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
  lines = [
    f"# The XSAM paper's protocol on MNIST-1D ({doc['mode']})",
    "",
    f"{doc['date']}; {m['cpu']} ({m['cpu_count']} cores), {m['platform']}, Python {m['python']}; {versions}.",
    (
      f"Command: `{doc['command']}`. Model {c['model']} width {c['width']}, {c['epochs']} epochs, batch "
      f"{c['batch_size']}, SGD momentum {c['momentum']} with cosine lr "
      f"after {c.get('warmup_epochs', 0)} warmup epochs; test split read for: "
      f"{', '.join(doc['test_reads'])} (test phase only)."
    ),
    "",
    *(f"- {k}: {v}" for k, v in doc["rules"].items()),
    "",
    "## Selection on validation (main arm)",
    "",
    *report.selection_table(doc["selection"]["main"]),
    "",
    "## Single step on test (main arm)",
    "",
    *_single(doc["single_step"]),
  ]
  if doc["rho"]:
    lines += [
      "",
      "## Varying rho (main arm; rho_max and the fixed alpha tuned per rho on validation)",
      "",
      *_rho(doc["rho"]),
    ]
  if doc["multistep"]:
    ks = list(c["ks"])
    title = f"## Multi-step (main arm; radius rule: {doc['rules']['multistep_radius']})"
    lines += ["", title, "", *_multistep(doc["multistep"], ks, list(c["multistep_methods"]))]
  for name, section in doc["regimes"].items():
    arm = section["arm"]
    lines += [
      "",
      (
        f"## Regime {name}: {arm['model']}, label noise {arm['regime']['label_noise']:g}, "
        f"training examples {arm['regime']['train_size'] or 'all'}"
      ),
      "",
      *report.selection_table(doc["selection"][name]),
      "",
      *_single(section),
    ]
  if doc.get("curves"):
    lines += ["", "## XSAM - SAM along the grids (test curves; curves.png)", ""]
    for name, curve in doc["curves"].items():
      lines += [*curves.table(name, curve), ""]
  toy = doc.get("toy2d") or {}
  if toy:
    lines += ["", "## 2-D study: momentum x alpha update period (experiments.toy2d.axes_sweep)", ""]
    lines += [toy["markdown"]] if "markdown" in toy else [f"Status: {toy['status']}."]
  lines += ["", "## Cost", "", *_cost(doc)]
  lines += ["", "## Tuning grids (validation)", ""]
  for name in doc["selection"]:
    lines += ["", f"### {name}", *report.grid_tables(doc["selection"][name])]
  for e in doc["rho"]:
    grids = {m: [r for r in e["grids"] if r["setting"]["method"] in kinds] for m, kinds in _RHO_GRIDS.items()}
    selection = {"grids": grids, "selected": {m: e["selected"][m] for m in grids}}
    lines += ["", f"### main, rho = {e['rho']:g}", *report.grid_tables(selection)]
  return "\n".join(lines) + "\n"
