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
  // What a person has typed (and where) survives a redraw.
  function key(input) { return input.form.getAttribute('action') + ' ' + input.name; }
  function swap(html) {
    const typed = {};
    for (const i of run.querySelectorAll('form input[name]')) {
      if (i.type !== 'hidden' && i.value) typed[key(i)] = i.value;
    }
    const a = document.activeElement;
    const focused = a && a.form && run.contains(a) ? key(a) : null;
    run.innerHTML = html;
    for (const i of run.querySelectorAll('form input[name]')) {
      const k = key(i);
      if (i.type !== 'hidden' && typed[k] !== undefined) i.value = typed[k];
      if (k === focused) i.focus();
    }
    showTexts();
  }
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    run.dataset.busy = '1';
    try {
      const sep = location.search ? '&' : '?';
      const r = await fetch(location.pathname + location.search + sep + 'fragment=1',
        { credentials: 'same-origin' });
      if (r.ok) swap(await r.text());
    } catch (e) { /* the next event tries again */ }
    busy = false;
    if (again) { again = false; refresh(); return; }
    // For tests and scripts: the page has caught up with the run's events so far.
    run.dataset.busy = '0';
    run.dataset.live = '1';
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
