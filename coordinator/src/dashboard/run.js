// Live updates of a run's page: its events arrive as server-sent events; on a change the
// page fetches the run's part again and swaps it in, without reloading; streamed text is
// appended as it comes.
(function () {
  const run = document.getElementById('run');
  if (!run) return;
  const texts = {};
  let busy = false, again = false;
  function showTexts() {
    for (const [step, text] of Object.entries(texts)) {
      const el = document.getElementById('delta-' + step);
      if (el) el.textContent = text;
    }
  }
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const sep = location.search ? '&' : '?';
      const r = await fetch(location.pathname + location.search + sep + 'fragment=1',
        { credentials: 'same-origin' });
      if (r.ok) { run.innerHTML = await r.text(); showTexts(); }
    } catch (e) { /* the next event tries again */ }
    busy = false;
    if (again) { again = false; refresh(); }
  }
  const events = new EventSource(run.dataset.events);
  events.addEventListener('change', refresh);
  events.addEventListener('delta', function (e) {
    const d = JSON.parse(e.data);
    texts[d.step] = (d.restart ? '' : (texts[d.step] || '')) + d.text;
    showTexts();
  });
  events.addEventListener('end', function () { events.close(); refresh(); });
})();
