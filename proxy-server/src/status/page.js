// The status page's filter, sort and live refresh, over the table the server rendered (see
// page.rs). Each row has data-name, data-state and data-sort (its numeric sort keys); the filter
// matches the text of the cluster and agents cells. Filter, state and sort live in the URL
// fragment, so a view can be shared and survives a reload; the refresh swaps in the server's new
// rows and applies the view again, so nothing the user typed is lost.
"use strict";

// Loaded in <head>, before the table: the style hides the table until it has been sorted and
// filtered once (see page.css), instead of drawing it row by row as it arrives.
document.documentElement.classList.add("js");

document.addEventListener("DOMContentLoaded", () => {
  const $ = (id) => document.getElementById(id);
  const table = $("clusters");
  const filter = $("filter");
  const state = $("state");
  const shown = $("shown");
  const stale = $("stale");
  const more = $("more");
  const refreshMs = Number(document.body.dataset.refresh) * 1000;
  // Rows drawn at first, and added each time the end of the table scrolls into view: laying out
  // thousands of rows at once takes the browser seconds, a few hundred a few milliseconds.
  const PAGE = 250;
  let limit = PAGE;
  // Position of each numeric column's key in a row's data-sort; other columns sort by name.
  const numeric = { agents: 0, open: 1, bytes: 2, p50: 3, failures: 4 };
  const headers = Array.from(table.tHead.rows[0].cells).filter((th) => th.dataset.sort);
  // Per row, parsed once: its sort keys and the lower-case text the filter searches.
  const facts = new WeakMap();
  let sortKey = "";
  let descending = false;
  let lastGood = new Date();

  const rows = () => Array.from(table.tBodies[0].rows).filter((r) => r.dataset.name !== undefined);
  const factsOf = (r) => {
    let f = facts.get(r);
    if (!f) {
      f = {
        keys: r.dataset.sort.split(" ").map(Number),
        text: (r.cells[0].textContent + " " + r.cells[1].textContent).toLowerCase(),
      };
      facts.set(r, f);
    }
    return f;
  };
  const byName = (a, b) => (a.dataset.name < b.dataset.name ? -1 : a.dataset.name > b.dataset.name ? 1 : 0);

  function readFragment() {
    const p = new URLSearchParams(location.hash.slice(1));
    filter.value = p.get("q") || "";
    state.value = ["up", "down"].includes(p.get("state")) ? p.get("state") : "";
    sortKey = headers.some((th) => th.dataset.sort === p.get("sort")) ? p.get("sort") : "";
    descending = p.get("dir") === "desc";
  }

  function writeFragment() {
    const p = new URLSearchParams();
    if (filter.value) p.set("q", filter.value);
    if (state.value) p.set("state", state.value);
    if (sortKey) {
      p.set("sort", sortKey);
      if (descending) p.set("dir", "desc");
    }
    const fragment = p.toString();
    history.replaceState(null, "", fragment ? "#" + fragment : location.pathname + location.search);
  }

  // Sorts (when a column is chosen), then shows only the rows that match. The server's order
  // is by name.
  function apply() {
    const all = rows();
    if (sortKey) {
      const sign = descending ? -1 : 1;
      const i = numeric[sortKey];
      const compare =
        i === undefined
          ? (a, b) => sign * byName(a, b)
          : (a, b) => sign * (factsOf(a).keys[i] - factsOf(b).keys[i]) || byName(a, b);
      all.sort(compare);
      const fragment = document.createDocumentFragment();
      for (const r of all) fragment.appendChild(r);
      table.tBodies[0].appendChild(fragment);
    }
    const q = filter.value.trim().toLowerCase();
    const wanted = state.value;
    let matched = 0;
    for (const r of all) {
      const match = (!wanted || r.dataset.state === wanted) && (!q || factsOf(r).text.includes(q));
      const show = match && matched < limit;
      // Only what changes is written: each write to a row costs a style update.
      if (r.hidden === show) r.hidden = !show;
      if (match) matched += 1;
    }
    const drawn = Math.min(matched, limit);
    shown.value =
      `${matched} of ${all.length} clusters` + (drawn < matched ? `, first ${drawn} shown (scroll for more)` : "");
    more.hidden = drawn >= matched;
    for (const th of headers) {
      const on = th.dataset.sort === sortKey;
      th.setAttribute("aria-sort", on ? (descending ? "descending" : "ascending") : "none");
    }
    table.classList.add("ready");
    writeFragment();
  }

  async function refresh() {
    if (document.hidden) return;
    try {
      const resp = await fetch(location.pathname, { cache: "no-store" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const page = new DOMParser().parseFromString(await resp.text(), "text/html");
      for (const id of ["summary", "about"]) {
        const fresh = page.getElementById(id);
        if (fresh) $(id).replaceWith(fresh);
      }
      table.tBodies[0].replaceWith(page.getElementById("clusters").tBodies[0]);
      lastGood = new Date();
      stale.hidden = true;
      apply();
    } catch (e) {
      stale.textContent = `Refresh failed (${e.message}); showing data from ${lastGood.toLocaleTimeString()}.`;
      stale.hidden = false;
    }
  }

  for (const th of headers) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = th.textContent;
    button.title = "sort";
    th.replaceChildren(button);
    button.addEventListener("click", () => {
      // A new column sorts the way people look at it first: names A-Z, numbers largest first.
      if (sortKey === th.dataset.sort) descending = !descending;
      else [sortKey, descending] = [th.dataset.sort, th.dataset.sort in numeric];
      fresh();
    });
  }
  const controls = $("controls");
  controls.addEventListener("submit", (e) => e.preventDefault());
  // A new view starts with one page of rows.
  const fresh = () => {
    limit = PAGE;
    apply();
  };
  filter.addEventListener("input", fresh);
  state.addEventListener("change", fresh);
  const grow = () => {
    limit += PAGE;
    apply();
  };
  more.querySelector("button").addEventListener("click", grow);
  new IntersectionObserver((seen) => {
    if (seen.some((e) => e.isIntersecting) && !more.hidden) grow();
  }).observe(more);
  window.addEventListener("hashchange", () => {
    readFragment();
    fresh();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== filter) {
      e.preventDefault();
      filter.focus();
    }
  });
  controls.hidden = false;
  readFragment();
  apply();
  // The next refresh is planned once this one is done, so a slow server never has two pending.
  const loop = async () => {
    await refresh();
    setTimeout(loop, refreshMs);
  };
  setTimeout(loop, refreshMs);
});
