// Browser tests of the page served by `clipdb serve`, in real Chromium
// (Debian's /usr/bin/chromium, driven by playwright-core; no browser is
// downloaded). The database is the demo's, built by the README's first
// command in its non-serving mode (CLIPDB_DEMO_SERVE=0 tools/demo.sh), so
// the tests exercise the same path a person takes. Each test saves a
// screenshot under $CLIPDB_BROWSER_OUT/<test>/ (default
// build/browser-tests/<test>/).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.CLIPDB_BIN || path.join(ROOT, 'build/clipdb');
const CHROMIUM = process.env.CLIPDB_CHROMIUM || '/usr/bin/chromium';
const OUT = process.env.CLIPDB_BROWSER_OUT || path.join(ROOT, 'build/browser-tests');
const DEMO_DIR = process.env.CLIPDB_DEMO_DIR || path.join(ROOT, '.cache/demo');
const SHARED = process.env.CLIPDB_SHARED || path.join(ROOT, '../shared');
const PHOTOS = path.join(SHARED, 'data/coco-subset/images');

let server, url, browser, profile;
const skip = !fs.existsSync(PHOTOS) ? `shared data not found at ${PHOTOS}` :
  !fs.existsSync(CHROMIUM) ? `${CHROMIUM} not found (apt-get install chromium)` : false;

function startServer(db) {
  return new Promise((resolve, reject) => {
    const p = spawn(BIN, ['serve', db, '--port', '0', '--quiet'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let buf = '';
    p.stdout.on('data', (d) => {
      buf += d;
      const m = buf.match(/http:\/\/[0-9.]+:[0-9]+/);
      if (m) resolve({ proc: p, url: m[0] });
    });
    p.on('exit', (code) => reject(new Error(`clipdb serve exited (${code}): ${buf}`)));
  });
}

before(async () => {
  if (skip) return;
  // the README's first command, without serving: builds or updates the demo database
  const r = spawnSync('bash', [path.join(ROOT, 'tools/demo.sh')], {
    env: { ...process.env, CLIPDB_DEMO_SERVE: '0', CLIPDB_BIN: BIN, CLIPDB_DEMO_DIR: DEMO_DIR },
    encoding: 'utf8', timeout: 30 * 60 * 1000,
  });
  assert.equal(r.status, 0, `tools/demo.sh failed:\n${r.stdout}\n${r.stderr}`);
  ({ proc: server, url } = await startServer(path.join(DEMO_DIR, 'coco.db')));
  profile = fs.mkdtempSync(path.join(os.tmpdir(), 'clipdb-chromium-'));
  // a fresh profile (playwright passes it as --user-data-dir)
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server && server.exitCode === null) server.kill('SIGTERM');
  if (profile) fs.rmSync(profile, { recursive: true, force: true });
});

async function page(t, viewport = { width: 1280, height: 900 }, base = url) {
  const p = await browser.newPage();
  await p.setViewportSize(viewport);
  const errors = [];
  p.on('pageerror', (e) => errors.push(String(e)));
  p.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) errors.push(m.text()); });
  await p.goto(base + '/');
  await until(p, () => /images/.test(document.getElementById('dbinfo').textContent));
  t.after(async () => { await p.close(); });
  return { p, errors };
}

// Polls fn(arg) in the page until it is true. (page.waitForFunction builds
// its predicate with eval, which the page's Content-Security-Policy forbids,
// as it should.)
async function until(p, fn, arg, timeout = 60000) {
  const t0 = Date.now();
  for (;;) {
    if (await p.evaluate(fn, arg)) return;
    if (Date.now() - t0 > timeout) throw new Error(`timed out waiting for ${fn}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function shot(p, name) {
  const dir = path.join(OUT, name);
  fs.mkdirSync(dir, { recursive: true });
  await p.screenshot({ path: path.join(dir, 'screenshot.png'), fullPage: true });
}

async function scores(p) {
  return p.$$eval('#results .score', (els) => els.map((e) => Number(e.textContent)));
}

async function textSearch(p, text) {
  await p.fill('#q', text);
  await p.press('#q', 'Enter');
  await until(p, (t) => document.getElementById('summary').textContent.includes(t), text);
}

const firstPhoto = () => path.join(PHOTOS, fs.readdirSync(PHOTOS).sort()[0]);

test('type a text: images appear', { skip }, async (t) => {
  const { p, errors } = await page(t);
  await textSearch(p, 'a dog playing in the snow');
  await until(p, () => {
    const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length >= 10 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  });
  assert.equal((await scores(p)).length, 12);
  assert.match(await p.textContent('#summary'), /ms \(encode .* ms, search .* ms\)/);
  await shot(p, 'text-to-image');
  assert.deepEqual(errors, []);
});

test('upload a photo: captions appear', { skip }, async (t) => {
  const { p, errors } = await page(t);
  await p.check('input[value=image-text]');
  await p.setInputFiles('#file', firstPhoto());
  await p.waitForSelector('#results .card .txt');
  const texts = await p.$$eval('#results .txt', (els) => els.map((e) => e.textContent));
  assert.equal(texts.length, 12);
  assert.ok(texts.every((x) => x.length > 5));
  await until(p, () => document.getElementById('preview').naturalWidth > 0);
  await shot(p, 'image-to-text');
  assert.deepEqual(errors, []);
});

test('switch the metric: scores change', { skip }, async (t) => {
  const { p } = await page(t);
  await textSearch(p, 'a red bus on a street');
  const cos = await scores(p);
  await p.selectOption('#metric', 'l2');
  await until(p, () => /· l2 ·/.test(document.getElementById('summary').textContent));
  const l2 = await scores(p);
  assert.equal(l2.length, cos.length);
  assert.notDeepEqual(l2, cos);
  assert.ok(l2.every((s) => s <= 0), 'l2 scores are negative distances');
  // the demo's IVF index serves cosine
  await p.selectOption('#metric', 'cosine');
  await until(p, () => /· cosine ·/.test(document.getElementById('summary').textContent));
  await p.selectOption('#index', 'ivf');
  await until(p, () => /ivf \(nprobe 8\)/.test(document.getElementById('summary').textContent));
  await shot(p, 'metric-l2-ivf');
});

test('click a result: a new search by that item', { skip }, async (t) => {
  const { p } = await page(t);
  await textSearch(p, 'two people on a beach');
  const id = await p.getAttribute('#results .card:nth-child(3)', 'data-id');
  await p.click('#results .card:nth-child(3) button.hit');
  await until(p, (i) => document.getElementById('summary').textContent.includes(`item #${i}`), id);
  // the item itself comes first, with cosine 1
  assert.equal(await p.getAttribute('#results .card:nth-child(1)', 'data-id'), id);
  assert.ok(Math.abs((await scores(p))[0] - 1) < 1e-3);
  // its details: the image and its captions
  await p.click('#results .card:nth-child(1) .more');
  await p.waitForSelector('#details[open] #details-body li');
  await shot(p, 'click-result-details');
});

test('a bad upload: an error in the page', { skip }, async (t) => {
  const { p } = await page(t);
  await p.check('input[value=image-image]');
  await p.setInputFiles('#file', { name: 'broken.jpg', mimeType: 'image/jpeg', buffer: Buffer.from('this is not a JPEG') });
  await p.waitForSelector('#error:not([hidden])');
  const msg = await p.textContent('#error');
  assert.match(msg, /image|decode|JPEG|format/i);
  await shot(p, 'bad-upload');
});

test('the evaluation tab: figures and the report with its plots', { skip }, async (t) => {
  const { p } = await page(t);
  await p.click('#tab-eval');
  await p.waitForSelector('#eval-table:not([hidden]) tbody tr', { timeout: 300000 });
  const rows = await p.$$eval('#eval-table tbody tr', (trs) => trs.map((tr) => tr.textContent));
  assert.equal(rows.length, 2);
  const frame = await (await p.waitForSelector('#eval-report:not([hidden])')).contentFrame();
  await frame.waitForSelector('img');
  const imgs = await frame.$$eval('img', (els) => els.filter((e) => e.naturalWidth > 0).length);
  assert.ok(imgs >= 2, `plots shown: ${imgs}`);
  await shot(p, 'evaluation');
});

// The bodies of the page's searches, as sent.
function searchBodies(p) {
  const bodies = [];
  p.on('request', (r) => {
    if (r.url().endsWith('/api/search') && r.method() === 'POST') bodies.push(JSON.parse(r.postData()));
  });
  return bodies;
}

async function ids(p) {
  return p.$$eval('#results .card', (els) => els.map((e) => e.dataset.id));
}

test('the model switch: hidden with one vector set', { skip }, async (t) => {
  const { p, errors } = await page(t);
  const bodies = searchBodies(p);
  assert.equal(await p.isVisible('#vectors'), false);
  assert.equal(await p.$eval('#model-wrap', (e) => e.hidden), true);
  await textSearch(p, 'a plate of food');
  assert.ok(bodies.length >= 1 && bodies.every((b) => !('space' in b)), JSON.stringify(bodies));
  await shot(p, 'model-switch-one-set');
  assert.deepEqual(errors, []);
});

test('the model switch: two vector sets, switching sends space=finetuned', { skip }, async (t) => {
  // a copy of the demo database with a second vector set, made as the
  // README says (clipdb reembed DB --model M2 --as finetuned); M2 is a tiny
  // seeded model with the real tokenizer, so its rankings differ
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'clipdb-sets-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const db = path.join(dir, 'coco.db');
  for (const ext of ['', '-wal']) {
    const from = path.join(DEMO_DIR, 'coco.db' + ext);
    if (fs.existsSync(from)) fs.copyFileSync(from, db + ext);
  }
  const m2 = path.join(dir, 'm2');
  let r = spawnSync('/usr/bin/python3', [path.join(ROOT, 'tools/gen_model.py'), m2, '--size', 'tiny', '--seed', '7'],
                    { encoding: 'utf8', cwd: ROOT, env: { ...process.env, CLIPDB_SHARED: SHARED } });
  assert.equal(r.status, 0, `gen_model.py: ${r.stderr}`);
  r = spawnSync(BIN, ['reembed', db, '--model', m2, '--as', 'finetuned'], { encoding: 'utf8', timeout: 10 * 60 * 1000 });
  assert.equal(r.status, 0, `reembed: ${r.stdout}\n${r.stderr}`);
  const two = await startServer(db);
  t.after(() => { if (two.proc.exitCode === null) two.proc.kill('SIGTERM'); });

  const { p, errors } = await page(t, undefined, two.url);
  const bodies = searchBodies(p);
  await until(p, () => !document.getElementById('model-wrap').hidden);
  assert.equal(await p.isVisible('#vectors'), true);
  assert.deepEqual(await p.$$eval('#vectors option', (os) => os.map((o) => o.value)), ['base', 'finetuned']);
  await textSearch(p, 'a man riding a horse');
  const base = { ids: await ids(p), scores: await scores(p) };
  assert.equal(bodies.at(-1).space, 'base');
  // switching the set searches again, on the other set
  const [resp] = await Promise.all([
    p.waitForResponse((x) => x.url().endsWith('/api/search')),
    p.selectOption('#vectors', 'finetuned'),
  ]);
  assert.equal(resp.status(), 200);
  assert.equal(bodies.at(-1).space, 'finetuned');
  assert.equal(bodies.at(-1).text, 'a man riding a horse');
  await until(p, () => !document.getElementById('results').hasAttribute('aria-busy'));
  const ft = { ids: await ids(p), scores: await scores(p) };
  assert.equal(ft.ids.length, base.ids.length);
  assert.notDeepEqual(ft, base, 'the other vector set ranks differently');
  await shot(p, 'model-switch-two-sets');
  assert.deepEqual(errors, []);
});

test('phone layout, keyboard, and a server that stopped', { skip }, async (t) => {
  const { p } = await page(t, { width: 390, height: 844 });
  await textSearch(p, 'a cat on a sofa');
  await p.waitForSelector('#results img');
  const cols = await p.$eval('#results', (e) => getComputedStyle(e).gridTemplateColumns.split(' ').length);
  assert.equal(cols, 2);
  const overflow = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page wider than the phone by ${overflow}px`);
  // keyboard: Tab reaches the result buttons; Enter searches by the focused one
  await p.focus('#results .card:nth-child(2) button.hit');
  const id = await p.getAttribute('#results .card:nth-child(2)', 'data-id');
  await p.keyboard.press('Enter');
  await until(p, (i) => document.getElementById('summary').textContent.includes(`item #${i}`), id);
  await shot(p, 'phone');
  server.kill('SIGTERM');
  await new Promise((r) => server.once('exit', r));
  await p.fill('#q', 'anything');
  await p.press('#q', 'Enter');
  await p.waitForSelector('#error:not([hidden])');
  assert.match(await p.textContent('#error'), /not answering/);
  await shot(p, 'server-stopped');
});
