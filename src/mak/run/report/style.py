"""How the page looks: the colour scheme and the inline stylesheet.

Strategies take the colours of ``PALETTE`` in order (the seed alone, ``none``, is grey); the
other colours mark the seed, the out-of-domain share, the Few classes and the rest. ``CSS``
styles the class names that the page sections and the SVG charts emit.
"""

PALETTE = ("#3b6fd4", "#e8833a", "#2a9d8f", "#d1495b", "#8e6cc0", "#c9a227", "#4aa3df", "#b5651d",
           "#6a994e", "#e07bb5")
NONE_COLOR = "#6b7280"
SEED_COLOR = "#c3cad5"
REST_COLOR = "#aab4c2"
OOD_COLOR = "#d64545"
FEW_COLOR = "#2f9e6a"
NEAR_COLOR = "#d9a13b"  # classes the seed lacks
EXTRA_COLORS = ("#374151", "#9ca3af", "#7c3aed", "#0f766e")

CSS = """
:root{--fg:#1f2933;--muted:#5f6b7a;--bg:#f3f5f8;--card:#fff;--line:#e2e7ee;--best:#e3f4e8;--bestfg:#14532d}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:26px 28px 64px}
header h1{font-size:27px;margin:0 0 2px;letter-spacing:-.01em}
.sub{color:var(--muted);font-size:14px}
.nav{margin:10px 0 0;display:flex;flex-wrap:wrap;gap:6px}
.nav a{text-decoration:none}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(205px,1fr));gap:12px;margin:18px 0 6px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:11px 14px}
.card .k{font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .v{font-size:19px;font-weight:650;margin-top:5px;display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.card .d{font-size:13px;color:var(--muted);margin-top:2px}
.chip{display:inline-block;padding:1px 9px;border-radius:999px;color:#fff;font-weight:600;font-size:13.5px;
 line-height:1.6;white-space:nowrap}
section,details.strat{background:var(--card);border:1px solid var(--line);border-radius:12px;
 padding:16px 20px;margin:18px 0}
h2{font-size:19px;margin:0 0 10px}
h3{font-size:15px;margin:18px 0 8px}
.tablewrap{overflow-x:auto}
table.cmp{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:14.5px}
table.cmp th,table.cmp td{padding:7px 9px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}
table.cmp th{font-weight:600;color:#374151;font-size:13px}
table.cmp thead tr.grp th{color:var(--muted);font-weight:500;font-size:12px;text-transform:uppercase;
 letter-spacing:.04em;border-bottom:none;text-align:center}
table.cmp thead tr.grp th.g{border-bottom:2px solid var(--line)}
table.cmp td.name,table.cmp th.name{text-align:left}
table.cmp td.best{background:var(--best);color:var(--bestfg);font-weight:700}
table.cmp tr.none td{color:#4b5563}
.sd{color:var(--muted);font-size:.82em;font-weight:400;margin-left:2px}
td.best .sd{color:#3f7a52}
.na{color:#c0c6cf}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:7px;vertical-align:0}
.keys{margin:12px 0 0;padding:0;list-style:none;display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));
 gap:3px 22px;font-size:13px;color:var(--muted)}
.keys b{color:var(--fg);font-weight:600}
.comp{margin-top:16px}
.comp .rows{display:grid;grid-template-columns:max-content 1fr;align-items:center;gap:6px 12px}
.comp .bar{display:flex;height:22px;border-radius:5px;overflow:hidden;background:#edf0f4}
.comp .bar span{display:flex;align-items:center;justify-content:center;color:#fff;font-size:11.5px;
 font-weight:600;overflow:hidden;white-space:nowrap}
details.strat>summary{cursor:pointer;font-size:18px;font-weight:650;list-style:none;display:flex;
 align-items:center;gap:10px;flex-wrap:wrap}
details.strat>summary::-webkit-details-marker{display:none}
details.strat>summary::before{content:"\\25B8";color:var(--muted);font-size:14px;transition:transform .15s}
details.strat[open]>summary::before{transform:rotate(90deg)}
.facts{font-size:13.5px;color:var(--muted);font-weight:400}
.params{margin:8px 0 2px;display:flex;flex-wrap:wrap;gap:5px}
.params code{background:#f1f3f6;border:1px solid var(--line);border-radius:5px;padding:0 6px;font-size:12px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:14px 22px;margin-top:12px}
figure{margin:0}
figcaption{font-size:14px;margin-bottom:4px}
figcaption b{font-weight:600}
figcaption span{display:block;color:var(--muted);font-size:12.5px}
.chart-svg{width:100%;height:auto;display:block}
.chart-svg text{font-family:inherit}
.chart-svg .tick{font-size:10.5px;fill:#6b7280}
.chart-svg .axlabel{font-size:11.5px;fill:#4b5563}
.chart-svg .ptitle{font-size:11.5px;fill:#374151;font-weight:600}
.chart-svg .barlabel{font-size:10px;font-weight:600}
.chart-svg .empty{font-size:12px;fill:#9ca3af}
.chart-svg .grid{stroke:#edf0f4;stroke-width:1}
.chart-svg .axis{stroke:#9aa3af;stroke-width:1}
.chart-svg .sep{stroke:#d5dae1;stroke-dasharray:3 3}
.chart-svg .thr{stroke:#111827;stroke-width:1.6;stroke-dasharray:5 3}
.chart-svg .thrlabel{font-size:11px;fill:#111827;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12.5px;color:#374151;margin:4px 0 0 50px}
.legend span{display:inline-flex;align-items:center;gap:5px}
.legend .sw{width:12px;height:12px;border-radius:3px;display:inline-block;opacity:.85}
.legend .ln{width:18px;height:0;display:inline-block}
.grids{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:14px 22px;margin-top:12px}
.thumbs{display:grid;grid-template-columns:repeat(8,56px);gap:3px;margin-top:4px}
.thumbs img,.thumbs .miss{width:56px;height:56px;border-radius:3px;image-rendering:pixelated;
 background:#000;display:block;outline:1px solid #e5e7eb}
.thumbs img.ood{outline:2.5px solid #d64545;outline-offset:-2.5px}
.thumbs .miss{background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 4px,#e5e7eb 4px,#e5e7eb 8px)}
.note{font-size:13px;color:var(--muted)}
table.picks{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums;margin-top:6px}
table.picks th,table.picks td{padding:3px 9px;border-bottom:1px solid var(--line);text-align:right}
table.picks td.item{text-align:left;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 max-width:460px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
details.sub>summary{cursor:pointer;font-size:14px;font-weight:600;margin-top:12px}
ul.notes{margin:0;padding-left:20px;color:#374151}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:26px}
"""
