// The overview refreshes its figures every 3 s, without reloading the page.
(function () {
  const live = document.getElementById('live');
  if (!live) return;
  setInterval(async function () {
    const sep = location.search ? '&' : '?';
    try {
      const r = await fetch(location.pathname + location.search + sep + 'fragment=1',
        { credentials: 'same-origin' });
      if (r.ok) live.innerHTML = await r.text();
    } catch (e) { /* next time */ }
  }, 3000);
})();
