"""The page's own CSS and JavaScript, in one place (Gradio 6 takes both at launch: app.launch_kwargs passes them).

Each rule names the element it fixes by elem_id / elem_classes set in ui/training.py and ui/chat.py.
"""
from __future__ import annotations

CSS = """
/* Sample answers: base and fine-tuned side by side in equal halves, every table as wide as the column. */
#samples table { width: 100%; table-layout: fixed; }
#samples th, #samples td { width: 50%; overflow-wrap: anywhere; vertical-align: top; }

/* An upload widget's drop area starts below its label, so the label never covers the upload icon. */
.upload-box .upload-container { padding-top: 28px; }

/* Past runs: its columns are shares of the width (render.RUN_WIDTHS); a long run name or status wraps inside the
   cell instead of being cut. */
#runs-table .body-cell span { overflow-wrap: anywhere; }
#runs-table .body-cell, #runs-table .header-cell { font-family: var(--font); font-size: 0.9em; }
#runs-table .header-cell { font-size: 0.85em; }
#runs-table .header-cell * { word-break: normal; overflow-wrap: normal; }

/* A run's evaluation card (ui/runcard.py): its figures block wraps a long line (the held-out rows' source) instead of
   scrolling sideways on a narrow page; a short header such as "row" is never broken inside the word. */
#eval-card pre, #eval-card code { white-space: pre-wrap; overflow-wrap: anywhere; }
#eval-card th { word-break: normal; overflow-wrap: normal; }

/* A loss plot with no points yet (the script below marks it): no axis labels (its placeholder rows would show a
   lone "1.000000" tick), and a line saying what will appear. */
.loss-plot.no-points :is(.role-axis-label, .role-axis-tick, .role-axis-grid) { visibility: hidden; }
.loss-plot.no-points::after {
  position: absolute; top: 45%; left: 0; right: 0; text-align: center; pointer-events: none;
  color: var(--body-text-color-subdued); content: "The loss curve appears here once the first step is logged.";
}
#run-plot.no-points::after { content: "Pick a finished or stopped run above to see its loss curve."; }
"""

# "Log (last lines)" stays on its newest line unless the reader scrolls up, and follows again once they scroll back
# to the bottom. Gradio 6.31's own Textbox autoscroll only fires once (its effect does not track the value), and a
# textarea's value changing fires no event, hence the poll.
JS = """
() => {
  const follow = () => {
    for (const box of document.querySelectorAll('.pin-bottom textarea')) {
      if (!box.dataset.pinned) {
        box.dataset.pinned = '1';
        box.addEventListener('scroll', () => {
          box.dataset.pinned = box.scrollTop + box.clientHeight >= box.scrollHeight - 8 ? '1' : '0';
        });
      }
      if (box.dataset.pinned === '1' && box.scrollTop + box.clientHeight < box.scrollHeight) {
        box.scrollTop = box.scrollHeight;
      }
    }
  };
  // A plot's data changes without any event the page can hear either: mark a loss plot whose lines draw nothing.
  const empty = () => {
    for (const plot of document.querySelectorAll('.loss-plot')) {
      const lines = [...plot.querySelectorAll('.mark-line path')];
      plot.classList.toggle('no-points', lines.length > 0 && lines.every((p) => !p.getAttribute('d')));
    }
  };
  setInterval(() => { follow(); empty(); }, 250);
}
"""
