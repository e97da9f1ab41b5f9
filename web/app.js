// clipdb's page: plain JavaScript, no framework and no build step (the page is
// small; a library would add more bytes than it saves). Talks to the JSON API
// of `clipdb serve` on the same origin only.
'use strict';
const $ = (id) => document.getElementById(id);
const state = { file: null, stats: null, last: null };

function tool() {
  const t = document.querySelector('input[name=tool]:checked').value.split('-');
  return { input: t[0], target: t[1] };
}

function showError(msg) {
  const e = $('error');
  e.textContent = msg;
  e.hidden = !msg;
}

async function api(path, opts) {
  let r;
  try {
    r = await fetch(path, opts);
  } catch (err) {
    throw new Error('The server is not answering: is `clipdb serve` still running?');
  }
  let body = null;
  try { body = await r.json(); } catch (err) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || ('HTTP ' + r.status));
  return body;
}

async function loadStats() {
  try {
    const s = await api('/api/stats');
    state.stats = s;
    $('dbinfo').textContent = `${s.images} images · ${s.texts} texts · model ${s.model}`;
    $('k').max = s.max_k;
    // The model switch ("fine-tuned or not") appears only when the database
    // holds more than one vector set (base, plus those clipdb reembed adds).
    const sets = s.vector_sets || ['base'];
    const sel = $('vectors');
    sel.replaceChildren(...sets.map((v) => new Option(v === 'base' ? 'pretrained (base)' : v, v)));
    $('model-wrap').hidden = sets.length < 2;
  } catch (err) {
    $('dbinfo').textContent = '';
    showError(err.message);
  }
}

function params() {
  const t = tool();
  const p = { target: t.target, k: Number($('k').value) || 10, metric: $('metric').value,
              index: $('index').value };
  if (p.index === 'ivf') p.nprobe = Number($('nprobe').value) || 8;
  if (!$('model-wrap').hidden) p.space = $('vectors').value;
  return p;
}

// query: {text} | {item} | {file}
async function search(query) {
  const p = params();
  let opts;
  if (query.file) {
    const fd = new FormData();
    fd.append('image', query.file, query.file.name || 'upload');
    for (const [k, v] of Object.entries(p)) fd.append(k, String(v));
    opts = { method: 'POST', body: fd };
  } else {
    opts = { method: 'POST', headers: { 'Content-Type': 'application/json' },
             body: JSON.stringify(Object.assign({}, p, query)) };
  }
  state.last = query;
  $('summary').textContent = 'searching…';
  $('results').setAttribute('aria-busy', 'true');
  try {
    const res = await api('/api/search', opts);
    showError('');
    render(res, query);
  } catch (err) {
    // no stale results under an error: they would answer another query
    $('summary').textContent = '';
    $('results').replaceChildren();
    showError(query.file ? `The upload could not be searched: ${err.message}` : err.message);
  } finally {
    $('results').removeAttribute('aria-busy');
  }
}

function describe(query) {
  if (query.text !== undefined) return `“${query.text}”`;
  if (query.item !== undefined) return `item #${query.item}`;
  return `the image ${query.file && query.file.name ? query.file.name : ''}`.trim();
}

function render(res, query) {
  const list = $('results');
  const q = res.query;
  list.className = q.target === 'text' ? 'texts' : 'images';
  let s = `${res.results.length} ${q.target}s nearest to ${describe(query)} · ${q.metric} · ${q.index}` +
          (q.nprobe ? ` (nprobe ${q.nprobe})` : '');
  if ($('showtime').checked)
    s += ` · ${res.took_ms.toFixed(1)} ms (encode ${res.timings.encode_ms.toFixed(1)} ms, ` +
         `search ${res.timings.search_ms.toFixed(1)} ms)`;
  if (res.note) s += ` · ${res.note}`;
  $('summary').textContent = s;
  list.replaceChildren(...res.results.map((r, i) => card(r, i)));
}

function card(r, i) {
  const li = document.createElement('li');
  li.className = 'card';
  li.dataset.id = r.id;
  const hit = document.createElement('button');
  hit.type = 'button';
  hit.className = 'hit';
  const label = r.type === 'image' ? (r.path || `image #${r.id}`) : r.text;
  hit.title = `Search by this ${r.type} (#${r.id})`;
  hit.setAttribute('aria-label', `${i + 1}. ${label}, score ${r.score.toFixed(4)}: search by it`);
  if (r.type === 'image') {
    const img = document.createElement('img');
    img.src = `/api/items/${r.id}/thumb`;
    img.alt = label;
    img.loading = 'lazy';
    hit.append(img);
  } else {
    const d = document.createElement('div');
    d.className = 'txt';
    d.textContent = r.text;
    hit.append(d);
  }
  hit.addEventListener('click', () => search({ item: r.id }));
  const meta = document.createElement('div');
  meta.className = 'meta';
  const rank = document.createElement('span');
  rank.className = 'rank';
  rank.textContent = `#${i + 1}`;
  const score = document.createElement('span');
  score.className = 'score';
  score.textContent = r.score.toFixed(4);
  const more = document.createElement('button');
  more.type = 'button';
  more.className = 'more';
  more.textContent = 'details';
  more.setAttribute('aria-label', `details of item ${r.id}`);
  more.addEventListener('click', () => details(r.type === 'text' && r.image !== undefined ? r.image : r.id));
  meta.append(rank, score, more);
  li.append(hit, meta);
  return li;
}

async function details(id) {
  const body = $('details-body');
  body.replaceChildren();
  try {
    const d = await api(`/api/items/${id}`);
    const it = d.item;
    $('details-title').textContent = `${it.type} #${it.id}`;
    if (it.type === 'image') {
      const img = document.createElement('img');
      img.src = `/api/items/${it.id}/image`;
      img.alt = it.path || '';
      body.append(img);
      const p = document.createElement('p');
      const c = document.createElement('code');
      c.textContent = it.path;
      p.append(c);
      body.append(p);
    } else {
      const p = document.createElement('p');
      p.textContent = it.text;
      body.append(p);
    }
    if (d.captions.length) {
      const h = document.createElement('h3');
      h.textContent = 'Captions';
      const ul = document.createElement('ul');
      for (const c of d.captions) {
        const li = document.createElement('li');
        li.textContent = c.text;
        ul.append(li);
      }
      body.append(h, ul);
    }
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = 'Search by this item';
    b.addEventListener('click', () => { $('details').close(); search({ item: it.id }); });
    body.append(b);
    $('details').showModal();
  } catch (err) {
    showError(err.message);
  }
}

let evalLoaded = false;
async function loadEval() {
  if (evalLoaded) return;
  evalLoaded = true;
  $('eval-status').textContent = 'evaluating…';
  $('eval-error').hidden = true;
  try {
    const ev = await api('/api/eval');
    const rows = [['text → image', ev.t2i], ['image → text', ev.i2t]].filter((r) => r[1]);
    const r3 = (x) => (typeof x === 'number' ? x.toFixed(3) : '–');
    const n1 = (x) => (typeof x === 'number' ? (Number.isInteger(x) ? String(x) : x.toFixed(1)) : '–');
    $('eval-table').querySelector('tbody').replaceChildren(...rows.map(([name, d]) => {
      const tr = document.createElement('tr');
      for (const v of [name, n1(d.queries), r3(d['R@1']), r3(d['R@5']), r3(d['R@10']),
                       n1(d.median_rank), n1(d.mean_rank)]) {
        const td = document.createElement('td');
        td.textContent = v;
        tr.append(td);
      }
      return tr;
    }));
    $('eval-table').hidden = false;
    $('eval-status').textContent = `${ev.images} images, ${ev.captions} captions · metric ${ev.metric || 'cosine'}` +
      ' · the full report with the plots below';
    $('eval-report').src = '/api/eval/report';
    $('eval-report').hidden = false;
  } catch (err) {
    evalLoaded = false;
    $('eval-status').textContent = '';
    $('eval-error').textContent = err.message;
    $('eval-error').hidden = false;
  }
}

function setFile(f) {
  if (!f) return;
  state.file = f;
  const pv = $('preview');
  if (pv.src) URL.revokeObjectURL(pv.src);
  pv.src = URL.createObjectURL(f);
  pv.hidden = false;
  pv.onerror = () => { pv.hidden = true; };
  $('drop-text').textContent = `${f.name || 'pasted image'}: drop or paste another to replace`;
  search({ file: f });
}

function syncTool() {
  const t = tool();
  $('text-input').hidden = t.input !== 'text';
  $('image-input').hidden = t.input !== 'image';
}

function rerun() {
  if (state.last) search(state.last);
}

function init() {
  $('form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('q').value.trim();
    if (!text) { showError('Type a text to search for.'); return; }
    search({ text });
  });
  for (const r of document.querySelectorAll('input[name=tool]'))
    r.addEventListener('change', () => {
      syncTool();
      const t = tool();
      if (t.input === 'text' && $('q').value.trim()) search({ text: $('q').value.trim() });
      else if (t.input === 'image' && state.file) search({ file: state.file });
      else if (state.last && state.last.item !== undefined) rerun();
    });
  $('index').addEventListener('change', () => { $('nprobe-wrap').hidden = $('index').value !== 'ivf'; rerun(); });
  for (const id of ['metric', 'k', 'nprobe', 'vectors']) $(id).addEventListener('change', rerun);
  $('showtime').addEventListener('change', rerun);
  $('file').addEventListener('change', () => setFile($('file').files[0]));
  const drop = $('drop');
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); }
  });
  for (const ev of ['dragenter', 'dragover'])
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add('over'); });
  for (const ev of ['dragleave', 'drop'])
    drop.addEventListener(ev, () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    const f = e.dataTransfer.files[0];
    if (f) setFile(f);
  });
  document.addEventListener('paste', (e) => {
    const f = [...(e.clipboardData ? e.clipboardData.files : [])][0];
    if (!f) return;
    e.preventDefault();
    document.querySelector('input[value=image-' + tool().target + ']').checked = true;
    syncTool();
    setFile(f);
  });
  for (const tab of ['search', 'eval'])
    $('tab-' + tab).addEventListener('click', () => {
      for (const t of ['search', 'eval']) {
        $('tab-' + t).setAttribute('aria-selected', String(t === tab));
        $('panel-' + t).hidden = t !== tab;
      }
      if (tab === 'eval') loadEval();
    });
  syncTool();
  loadStats();
}

init();
