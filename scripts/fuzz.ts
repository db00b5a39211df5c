/**
 * The long fuzz run (not in CI): ≥ 100k seeded mutations per parser — overlay readers, memory
 * migration stream, libvirt save header, base package tar listing, qcow2 header (the targets of
 * test/helpers/fuzz-targets.ts). Each parser runs in a child process of its own, so its peak
 * RSS is its own; the parent is a watchdog: a child silent for --hang-ms is killed and the input
 * it was on is reported as a hang (and the run goes on after it). An input that throws anything
 * but a CloudletError is a crash: it is minimized and, with --save, kept in the corpus
 * (test/fuzz-corpus/<parser>/crash-<sha>.bin), which CI replays.
 *
 *   npm run build && node dist/scripts/fuzz.js [--inputs 100000] [--seed 1] [--only overlay] [--save]
 *
 * Prints per parser: inputs, accepted/refused, inputs/s, peak RSS, slowest input, hangs, crashes.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FUZZ_TARGETS, mutate, type FuzzTarget } from '../test/helpers/fuzz-targets.js';
import { repoRoot } from '../test/helpers/demo-vm.js';
import { rng } from '../test/helpers/rng.js';
import { CloudletError } from '../src/util/errors.js';

interface Args {
  inputs: number;
  seed: number;
  only?: string;
  save: boolean;
  hangMs: number;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { inputs: 100_000, seed: 1, save: false, hangMs: 10_000 };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    if (argv[i] === '--inputs' && v) a.inputs = Number(argv[++i]);
    else if (argv[i] === '--seed' && v) a.seed = Number(argv[++i]);
    else if (argv[i] === '--only' && v) a.only = argv[++i];
    else if (argv[i] === '--hang-ms' && v) a.hangMs = Number(argv[++i]);
    else if (argv[i] === '--save') a.save = true;
  }
  return a;
}

/** Messages a child sends. */
type ChildMsg =
  | { kind: 'at'; index: number }
  | { kind: 'progress'; done: number; accepted: number; refused: number; slowestMs: number; slowestAt: number }
  | { kind: 'crash'; index: number; error: string; input: string }
  | {
      kind: 'end';
      maxRssKiB: number;
      ms: number;
      done: number;
      accepted: number;
      refused: number;
      codes: Record<string, number>;
    };

/** The i-th input of a run: the same seed and index always give the same bytes. */
function inputAt(seeds: Buffer[], seed: number, target: FuzzTarget, i: number): Buffer {
  const rand = rng((seed * 1_000_003 + i) >>> 0);
  return mutate(seeds[i % seeds.length]!, rand, target.hotBytes);
}

async function isCrash(target: FuzzTarget, input: Buffer): Promise<string | undefined> {
  try {
    await target.run(input);
    return undefined;
  } catch (err) {
    return err instanceof CloudletError ? undefined : `${(err as Error).name}: ${(err as Error).message}`;
  }
}

/** Shortest input (by cutting the end, then single bytes) that still crashes with the same error. */
async function minimize(target: FuzzTarget, input: Buffer, error: string): Promise<Buffer> {
  const same = async (b: Buffer): Promise<boolean> => (await isCrash(target, b))?.split(':')[0] === error.split(':')[0];
  let best = input;
  for (let n = best.length >> 1; n >= 1; n >>= 1) {
    while (best.length > n && (await same(best.subarray(0, best.length - n)))) best = best.subarray(0, best.length - n);
  }
  for (let at = 0; at < best.length && at < 4096; at++) {
    const cut = Buffer.concat([best.subarray(0, at), best.subarray(at + 1)]);
    if (await same(cut)) {
      best = cut;
      at--;
    }
  }
  return best;
}

/** Child: runs inputs [start, end) of one target, reporting as it goes. */
async function child(name: string, seed: number, start: number, end: number): Promise<void> {
  const make = FUZZ_TARGETS.find((m) => m().name === name);
  if (!make) throw new Error(`no target ${name}`);
  const target = make();
  const seeds = await target.seeds();
  const send = (m: ChildMsg): void => void process.send?.(m);
  const t0 = performance.now();
  let accepted = 0;
  let refused = 0;
  let slowestMs = 0;
  let slowestAt = -1;
  const codes: Record<string, number> = {};
  for (let i = start; i < end; i++) {
    if (i % 200 === 0) send({ kind: 'at', index: i });
    const input = inputAt(seeds, seed, target, i);
    const s = performance.now();
    try {
      await target.run(input);
      accepted++;
    } catch (err) {
      if (err instanceof CloudletError) {
        refused++;
        codes[err.code] = (codes[err.code] ?? 0) + 1;
      } else {
        send({
          kind: 'crash',
          index: i,
          error: `${(err as Error).name}: ${(err as Error).message}`,
          input: input.toString('base64'),
        });
      }
    }
    const ms = performance.now() - s;
    if (ms > slowestMs) {
      slowestMs = ms;
      slowestAt = i;
    }
    if ((i - start) % 2000 === 1999)
      send({ kind: 'progress', done: i - start + 1, accepted, refused, slowestMs, slowestAt });
  }
  await target.close?.();
  send({
    kind: 'end',
    maxRssKiB: process.resourceUsage().maxRSS,
    ms: performance.now() - t0,
    done: end - start,
    accepted,
    refused,
    codes,
  });
}

interface Report {
  target: string;
  inputs: number;
  accepted: number;
  refused: number;
  seconds: number;
  perSecond: number;
  peakRssMiB: number;
  slowestMs: number;
  slowestInput: number;
  hangs: number[];
  crashes: Array<{ index: number; error: string; saved?: string }>;
  codes: Record<string, number>;
}

async function runTarget(name: string, a: Args): Promise<Report> {
  const script = fileURLToPath(import.meta.url);
  const r: Report = {
    target: name,
    inputs: 0,
    accepted: 0,
    refused: 0,
    seconds: 0,
    perSecond: 0,
    peakRssMiB: 0,
    slowestMs: 0,
    slowestInput: -1,
    hangs: [],
    crashes: [],
    codes: {},
  };
  let start = 0;
  const wall = performance.now();
  while (start < a.inputs) {
    let at = start;
    let last = Date.now();
    const got: { end?: Extract<ChildMsg, { kind: 'end' }>; progress?: Extract<ChildMsg, { kind: 'progress' }> } = {};
    const c: ChildProcess = fork(script, ['--child', name, String(a.seed), String(start), String(a.inputs)], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      execArgv: ['--max-old-space-size=2048'],
    });
    c.on('message', (m: ChildMsg) => {
      last = Date.now();
      if (m.kind === 'at') at = m.index;
      else if (m.kind === 'progress') got.progress = m;
      else if (m.kind === 'crash') r.crashes.push({ index: m.index, error: m.error, saved: m.input });
      else got.end = m;
    });
    const watchdog = setInterval(() => {
      if (Date.now() - last > a.hangMs) c.kill('SIGKILL');
    }, 500);
    const code = await new Promise<number | null>((resolve) => c.once('exit', (x) => resolve(x)));
    clearInterval(watchdog);
    const p = got.progress;
    const e = got.end;
    if (p && p.slowestMs > r.slowestMs) {
      r.slowestMs = p.slowestMs;
      r.slowestInput = p.slowestAt;
    }
    if (e) {
      r.inputs += e.done;
      r.accepted += e.accepted;
      r.refused += e.refused;
      r.peakRssMiB = Math.max(r.peakRssMiB, Math.round(e.maxRssKiB / 1024));
      for (const [k, v] of Object.entries(e.codes)) r.codes[k] = (r.codes[k] ?? 0) + v;
      break;
    }
    // Killed (silent too long) or died: the input it was on is a hang; go on after it.
    process.stderr.write(`${name}: child ended (${code}) near input ${at}: searching the hang\n`);
    const hang = await findHang(name, a, at);
    r.hangs.push(hang);
    r.inputs += hang - start + 1;
    start = hang + 1;
  }
  r.seconds = Math.round((performance.now() - wall) / 100) / 10;
  r.perSecond = Math.round(r.inputs / r.seconds);
  if (r.crashes.length > 0) {
    const make = FUZZ_TARGETS.find((m) => m().name === name)!;
    const target = make();
    for (const cr of r.crashes) {
      const input = Buffer.from(cr.saved ?? '', 'base64');
      const min = await minimize(target, input, cr.error);
      cr.saved = undefined;
      if (a.save) {
        const dir = join(repoRoot(), 'test', 'fuzz-corpus', name);
        await mkdir(dir, { recursive: true });
        const file = join(dir, `crash-${createHash('sha256').update(min).digest('hex').slice(0, 12)}.bin`);
        await writeFile(file, min);
        cr.saved = file;
      }
    }
    await target.close?.();
  }
  return r;
}

/** Runs inputs from `near` one at a time, each in its own child, until one does not finish in time. */
async function findHang(name: string, a: Args, near: number): Promise<number> {
  const script = fileURLToPath(import.meta.url);
  for (let i = near; i < Math.min(a.inputs, near + 400); i++) {
    const c = fork(script, ['--child', name, String(a.seed), String(i), String(i + 1)], { stdio: 'ignore' });
    let done = false;
    c.on('message', (m: ChildMsg) => {
      if (m.kind === 'end') done = true;
    });
    const timer = setTimeout(() => c.kill('SIGKILL'), a.hangMs);
    await new Promise((resolve) => c.once('exit', resolve));
    clearTimeout(timer);
    if (!done) return i;
  }
  return near;
}

const argv = process.argv.slice(2);
if (argv[0] === '--child') {
  await child(argv[1]!, Number(argv[2]), Number(argv[3]), Number(argv[4]));
} else {
  const a = parseArgs(argv);
  const names = FUZZ_TARGETS.map((m) => m().name).filter((n) => !a.only || n === a.only);
  const reports: Report[] = [];
  for (const n of names) {
    process.stderr.write(`fuzzing ${n}: ${a.inputs} inputs, seed ${a.seed}\n`);
    const r = await runTarget(n, a);
    reports.push(r);
    process.stdout.write(
      `${r.target.padEnd(18)} ${String(r.inputs).padStart(7)} inputs  ${String(r.perSecond).padStart(6)}/s  ` +
        `accepted ${r.accepted}  refused ${r.refused}  peak RSS ${r.peakRssMiB} MiB  ` +
        `slowest ${Math.round(r.slowestMs)} ms (#${r.slowestInput})  hangs ${r.hangs.length}  crashes ${r.crashes.length}\n`,
    );
  }
  process.stdout.write(JSON.stringify({ message_type: 'fuzz', seed: a.seed, reports }, null, 2) + '\n');
  if (reports.some((r) => r.hangs.length > 0 || r.crashes.length > 0)) process.exitCode = 1;
}
