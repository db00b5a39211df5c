/**
 * The realistic pair (test/helpers/bench-vm.ts: Debian 12, 512 MiB RAM, 2 GiB disk, python3 +
 * numpy installed from Debian packages in the resumed base), measured in one run:
 *   - create: 1 vs 2 threads (same bytes), memory-first vs disk-first, vs xdelta3 and casync
 *   - synthesis to the guest's first answer from a local file: sequential (rebuild into files,
 *     then QEMU) vs the pipeline; and QEMU itself resuming the full customized snapshot
 *   - synthesis from nginx throttled to 38 Mbps, 100 Mbps and 1 Gbps: first answer vs transfer
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { createOverlay } from '../../src/api/create.js';
import { synthesize, type SynthesizeResult } from '../../src/api/synthesize.js';
import { openLibraryBase } from '../../src/base/open.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import { resumeSpec, type VmSpec } from '../../src/spec/vm-spec.js';
import { startQemu } from '../../src/vm/process.js';
import { waitHttp } from '../../src/vm/ready.js';
import { APP_PORT, ensureBenchPair, type BenchPair } from '../../test/helpers/bench-vm.js';
import { cli } from '../../test/helpers/cli.js';
import { freePort } from '../../test/helpers/demo-vm.js';
import { nginxAvailable, startNginx } from '../../test/helpers/nginx.js';
import { dirBytes, fmtBytes, median, must, table, timed } from './util.js';

const exec = promisify(execFile);

export interface RealisticOptions {
  work: string;
  /** Runs per synthesis variant (median reported). */
  runs: number;
  /** Skip the slow peers (xdelta3 over 2.5 GB). */
  quick: boolean;
}

interface AppAnswer {
  token: string;
  app: string;
}

function appAnswer(r: SynthesizeResult): AppAnswer {
  return JSON.parse(r.answer?.body ?? '{}') as AppAnswer;
}

export async function realisticBench(o: RealisticOptions): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const pair: BenchPair = await ensureBenchPair((s) => console.error(`bench: ${s}`));
  const root = join(o.work, 'lib-realistic');
  const env = { ...process.env, CLOUDLET_LIBRARY: root };
  const [imported, importMs] = await timed(async () =>
    must(await cli(['base', 'import', pair.base, '--name', 'realistic'], env, 1_800_000), 'base import'),
  );
  const base = await openLibraryBase(root, String(imported['id']));
  // The customized disk is a qcow2 over the base disk: point it at the library's copy, so that
  // create reads only its own clusters (what a user's snapshot of a launched base looks like).
  const custDisk = join(o.work, 'realistic-custom.qcow2');
  await copyFile(join(pair.custom, 'disk.qcow2'), custDisk);
  await exec('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', base.diskPath!, '-F', 'raw', custDisk]);
  const custMem = join(pair.custom, 'memory.stream');
  const info = pair.info;
  console.log(
    `\nRealistic pair: Debian 12 guest, ${base.manifest.vm?.memoryMiB} MiB RAM, ` +
      `${fmtBytes(base.manifest.disk?.virtual_size ?? 0)} disk; in the resumed base: apt-get install ` +
      `python3-numpy (${info.packages} packages, ${info.installSeconds} s under TCG), archives deleted, a numpy ` +
      `HTTP service started. Customized memory stream ${fmtBytes(info.memoryStreamBytes)}; base import ` +
      `${(importMs / 1000).toFixed(1)} s.`,
  );

  // ---- create -------------------------------------------------------------------------------
  const creates: Record<string, { ms: number; size: number; path: string; segments: string[] }> = {};
  for (const [name, threads, order] of [
    ['1 thread', 1, 'memory-first'],
    ['2 threads', 2, 'memory-first'],
    ['2 threads, disk first', 2, 'disk-first'],
  ] as const) {
    const path = join(o.work, `realistic-${name.replace(/[^a-z0-9]+/g, '-')}.overlay`);
    const [r, ms] = await timed(() =>
      createOverlay({ base, disk: custDisk, memory: custMem, output: path, threads, order }),
    );
    const rd = await OverlayReader.open(path);
    creates[name] = { ms, size: r.size, path, segments: rd.index.segments.map((s) => s.sha256) };
    await rd.close();
  }
  const same = JSON.stringify(creates['1 thread']!.segments) === JSON.stringify(creates['2 threads']!.segments);
  const overlay = creates['2 threads']!.path;
  const overlaySize = creates['2 threads']!.size;

  const peers: string[][] = [];
  const custRaw = join(o.work, 'realistic-custom.raw');
  await exec('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', custDisk, custRaw]);
  const baseDisk = join(pair.base, 'disk.raw');
  const baseMem = join(pair.base, 'memory.stream');
  // casync: the base's chunks in the store, then what the customized VM adds.
  const store = join(o.work, 'realistic.castr');
  await mkdir(store, { recursive: true });
  await exec('casync', ['make', `--store=${store}`, join(o.work, 'rb-disk.caibx'), baseDisk]);
  await exec('casync', ['make', `--store=${store}`, join(o.work, 'rb-mem.caibx'), baseMem]);
  const storeBase = await dirBytes(store);
  const [, caMs] = await timed(async () => {
    await exec('casync', ['make', `--store=${store}`, join(o.work, 'rc-disk.caibx'), custRaw]);
    await exec('casync', ['make', `--store=${store}`, join(o.work, 'rc-mem.caibx'), custMem]);
  });
  const caSize =
    (await dirBytes(store)) -
    storeBase +
    (await stat(join(o.work, 'rc-disk.caibx'))).size +
    (await stat(join(o.work, 'rc-mem.caibx'))).size;
  peers.push(['casync make, base in store', fmtBytes(caSize), (caSize / overlaySize).toFixed(2), caMs.toFixed(0)]);
  if (!o.quick) {
    const xd = async (src: string, dst: string, outFile: string): Promise<number> => {
      const sz = (await stat(dst)).size;
      const [, ms] = await timed(() =>
        exec('xdelta3', ['-e', '-f', '-B', String(Math.min(2 ** 31 - 1, sz + 2 ** 20)), '-s', src, dst, outFile], {
          maxBuffer: 1 << 20,
        }),
      );
      return ms;
    };
    const xdMs =
      (await xd(baseDisk, custRaw, join(o.work, 'r-disk.vcdiff'))) +
      (await xd(baseMem, custMem, join(o.work, 'r-mem.vcdiff')));
    const xdSize = (await stat(join(o.work, 'r-disk.vcdiff'))).size + (await stat(join(o.work, 'r-mem.vcdiff'))).size;
    peers.push([
      'xdelta3 -e -s (disk + memory stream)',
      fmtBytes(xdSize),
      (xdSize / overlaySize).toFixed(2),
      xdMs.toFixed(0),
    ]);
  }
  await rm(custRaw, { force: true });
  console.log('\nRealistic pair: create (disk + memory)');
  console.log(
    table([
      ['method', 'size', 'vs ours', 'make (ms)'],
      ...Object.entries(creates).map(([k, v]) => [
        `cloudlet-overlay, ${k}`,
        fmtBytes(v.size),
        (v.size / overlaySize).toFixed(2),
        v.ms.toFixed(0),
      ]),
      ...peers,
    ]),
  );
  const ratio = creates['2 threads']!.ms / creates['1 thread']!.ms;
  console.log(`2 threads / 1 thread: ${ratio.toFixed(2)}; same bytes: ${same ? 'yes' : 'NO'}`);
  out['create'] = {
    creates: Object.fromEntries(Object.entries(creates).map(([k, v]) => [k, { ms: Math.round(v.ms), size: v.size }])),
    threads_ratio: ratio,
    same_bytes: same,
    casync: { size: caSize, ms: Math.round(caMs) },
  };

  // ---- synthesis from a local file ---------------------------------------------------------------
  const synth = async (
    label: string,
    overlayRef: string,
    extra: Partial<Parameters<typeof synthesize>[0]>,
    who: { base: string; token: string } = { base: 'realistic', token: pair.token },
  ): Promise<SynthesizeResult> => {
    const port = await freePort();
    const s = await synthesize({
      root,
      base: who.base,
      overlay: overlayRef,
      forwards: [{ hostPort: port, guestPort: APP_PORT }],
      waitHttp: `http://127.0.0.1:${port}/`,
      readyTimeoutMs: 180_000,
      ...extra,
    });
    const a = appAnswer(s.result);
    if (a.token !== who.token || a.app !== 'bench-numpy')
      throw new Error(`${label}: not the customized VM (${s.result.answer?.body})`);
    await s.vm.stop();
    await rm(s.state.dir, { recursive: true, force: true });
    return s.result;
  };
  const variants: Array<[string, string, Partial<Parameters<typeof synthesize>[0]>]> = [
    ['sequential (rebuild into files, then QEMU)', overlay, { pipeline: 'sequential' }],
    ['pipeline, 1 thread', overlay, { threads: 0 }],
    ['pipeline, 2 threads', overlay, {}],
    ['pipeline, disk-first overlay', creates['2 threads, disk first']!.path, {}],
    ['early start (disk over NBD until proven)', overlay, { earlyStart: true }],
  ];
  const results: Record<string, SynthesizeResult[]> = {};
  for (let i = 0; i < o.runs; i++) {
    for (const [label, ref, extra] of variants) (results[label] ??= []).push(await synth(label, ref, extra));
  }
  // The yardstick: QEMU by itself resuming the full customized snapshot (warm page cache).
  const yard: number[] = [];
  const spec = JSON.parse(await readFile(join(pair.custom, 'vm.json'), 'utf8')) as { vm: VmSpec };
  for (let i = 0; i < o.runs + 1; i++) {
    const dir = join(o.work, `yard-${i}`);
    await mkdir(dir, { recursive: true });
    const top = join(dir, 'disk.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', custDisk, '-F', 'qcow2', top]);
    const port = await freePort();
    const s: VmSpec = resumeSpec(
      { ...spec.vm, kernel: join(base.dir, 'kernel'), initrd: join(base.dir, 'initrd') },
      {
        incoming: { from: 'file', path: custMem },
        driveFiles: [top],
        forwards: [{ hostPort: port, guestPort: APP_PORT }],
      },
    );
    const t0 = performance.now();
    const vm = await startQemu(s, { runDir: dir, accel: 'auto' });
    await waitHttp(`http://127.0.0.1:${port}/`, { timeoutMs: 120_000, signal: vm.exitSignal });
    const ms = performance.now() - t0;
    await vm.stop();
    await rm(dir, { recursive: true, force: true });
    if (i > 0) yard.push(ms); // the first run warms the page cache for the 500 MB stream
  }
  const phases = [
    'qemu_start',
    'rebuild',
    'apply',
    'incoming_load',
    'load_wait',
    'memory_proven',
    'answered',
    'first_response',
    'independent',
    'total',
  ];
  const rows = [['phase (ms, median)', ...variants.map(([l]) => l)]];
  for (const p of phases) {
    rows.push([
      p,
      ...variants.map(([l]) => {
        const xs = results[l]!.map((r) => r.timings_ms[p]).filter((x): x is number => x !== undefined);
        return xs.length ? String(median(xs)) : '';
      }),
    ]);
  }
  const seqTotal = median(results[variants[0]![0]]!.map((r) => r.timings_ms['total']!));
  const pipeTotal = median(results['pipeline, 2 threads']!.map((r) => r.timings_ms['total']!));
  const yardMs = median(yard);
  console.log(
    `\nRealistic pair: synthesize a local overlay (${fmtBytes(overlaySize)}) → the numpy service's first answer, TCG`,
  );
  console.log(table(rows));
  console.log(
    `pipeline / sequential: ${(pipeTotal / seqTotal).toFixed(2)}; QEMU resuming the full customized ` +
      `snapshot by itself (${fmtBytes(info.memoryStreamBytes)} stream, warm cache): ${yardMs.toFixed(0)} ms → ` +
      `pipeline / QEMU alone: ${(pipeTotal / yardMs).toFixed(2)}`,
  );
  out['synthesis'] = {
    medians: Object.fromEntries(
      variants.map(([l]) => [
        l,
        Object.fromEntries(phases.map((p) => [p, median(results[l]!.map((r) => r.timings_ms[p] ?? 0))])),
      ]),
    ),
    qemu_full_resume_ms: Math.round(yardMs),
  };

  // ---- synthesis from a throttled web server ---------------------------------------------------------
  if (await nginxAvailable()) {
    const linkRows = [
      [
        'link',
        'transfer (bytes ÷ rate, s)',
        'sequential: answer (s)',
        'pipeline: answer (s)',
        'early start: answer (s)',
        'early: independent (s)',
        'early: fetched out of turn',
      ],
    ];
    const links: Record<string, unknown> = {};
    const webRoot = join(o.work, 'www');
    await mkdir(webRoot, { recursive: true });
    await copyFile(overlay, join(webRoot, 'app.overlay'));
    for (const [name, bps] of [
      ['38 Mbps', 38e6],
      ['100 Mbps', 100e6],
      ['1 Gbps', 1e9],
    ] as const) {
      const web = await startNginx(webRoot, join(o.work, `nginx-${bps}`), bps);
      try {
        const url = `${web.url}/app.overlay`;
        const seq = await synth(`${name} sequential`, url, { pipeline: 'sequential' });
        const pipe = await synth(`${name} pipeline`, url, {});
        const early = await synth(`${name} early start`, url, { earlyStart: true });
        const transfer = (overlaySize * 8) / bps;
        const s = (ms: number | undefined): number => (ms ?? 0) / 1000;
        const e = early.timings_ms;
        linkRows.push([
          name,
          transfer.toFixed(1),
          s(seq.timings_ms['total']).toFixed(1),
          s(pipe.timings_ms['total']).toFixed(1),
          s(e['answered']).toFixed(1),
          s(e['independent']).toFixed(1),
          `${e['early_segments_fetched'] ?? 0} segments, ${fmtBytes(e['early_bytes_fetched'] ?? 0)}`,
        ]);
        links[name] = {
          transfer_s: transfer,
          sequential_answer_s: s(seq.timings_ms['total']),
          pipeline_answer_s: s(pipe.timings_ms['total']),
          early_answer_s: s(e['answered']),
          early_memory_proven_s: s(e['memory_proven']),
          early_independent_s: s(e['independent']),
          early_segments_fetched: e['early_segments_fetched'] ?? 0,
          early_bytes_fetched: e['early_bytes_fetched'] ?? 0,
        };
      } finally {
        await web.stop();
      }
    }
    console.log('\nRealistic pair: synthesize from nginx (limit_rate) → first answer');
    console.log(table(linkRows));
    out['links'] = links;
    if (!o.quick) out['lean'] = await leanPair(o, root, synth);
  } else {
    console.log('\n(nginx not installed: the throttled-link runs were skipped; scripts/setup.sh installs it)');
  }
  await base.close();
  return out;
}

type Synth = (
  label: string,
  overlayRef: string,
  extra: Partial<Parameters<typeof synthesize>[0]>,
  who?: { base: string; token: string },
) => Promise<SynthesizeResult>;

/**
 * The same customization, snapshotted after `--drop-caches --zero-free-memory --trim`
 * (docs/semantic-gap.md): the installed files leave the page cache and free memory holds zeros,
 * so most of the change is disk — what early start can serve while the rest streams in.
 */
async function leanPair(o: RealisticOptions, root: string, synth: Synth): Promise<Record<string, unknown>> {
  const flags = ['--drop-caches', '--zero-free-memory', '--trim'];
  const pair = await ensureBenchPair((s) => console.error(`bench: ${s}`), { snapshotFlags: flags });
  const env = { ...process.env, CLOUDLET_LIBRARY: root };
  const imported = must(await cli(['base', 'import', pair.base, '--name', 'lean'], env, 1_800_000), 'base import');
  const base = await openLibraryBase(root, String(imported['id']));
  const custDisk = join(o.work, 'lean-custom.qcow2');
  await copyFile(join(pair.custom, 'disk.qcow2'), custDisk);
  await exec('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', base.diskPath!, '-F', 'raw', custDisk]);
  const overlay = join(o.work, 'lean.overlay');
  const made = await createOverlay({
    base,
    disk: custDisk,
    memory: join(pair.custom, 'memory.stream'),
    output: overlay,
  });
  // Memory comes first in an overlay: a memory-only overlay holds the same memory records.
  const memOnly = await createOverlay({
    base,
    memory: join(pair.custom, 'memory.stream'),
    output: join(o.work, 'lean-memory.overlay'),
  });
  const memoryBytes = memOnly.size;
  await base.close();
  const who = { base: 'lean', token: pair.token };
  const webRoot = join(o.work, 'www-lean');
  await mkdir(webRoot, { recursive: true });
  await copyFile(overlay, join(webRoot, 'lean.overlay'));
  const rows = [
    [
      'link',
      'transfer (s)',
      'pipeline: answer (s)',
      'early start: memory proven (s)',
      'early start: answer (s)',
      'answer / transfer',
      'early: independent (s)',
      'early: fetched out of turn',
    ],
  ];
  const links: Record<string, unknown> = {};
  for (const [name, bps] of [
    ['38 Mbps', 38e6],
    ['100 Mbps', 100e6],
  ] as const) {
    const web = await startNginx(webRoot, join(o.work, `nginx-lean-${bps}`), bps);
    try {
      const url = `${web.url}/lean.overlay`;
      const pipe = await synth(`lean ${name} pipeline`, url, {}, who);
      const early = await synth(`lean ${name} early start`, url, { earlyStart: true }, who);
      const transfer = (made.size * 8) / bps;
      const e = early.timings_ms;
      const sec = (ms: number | undefined): number => (ms ?? 0) / 1000;
      rows.push([
        name,
        transfer.toFixed(1),
        sec(pipe.timings_ms['total']).toFixed(1),
        sec(e['memory_proven']).toFixed(1),
        sec(e['answered']).toFixed(1),
        (sec(e['answered']) / transfer).toFixed(2),
        sec(e['independent']).toFixed(1),
        `${e['early_segments_fetched'] ?? 0} segments, ${fmtBytes(e['early_bytes_fetched'] ?? 0)}`,
      ]);
      links[name] = {
        transfer_s: transfer,
        pipeline_answer_s: sec(pipe.timings_ms['total']),
        early_memory_proven_s: sec(e['memory_proven']),
        early_answer_s: sec(e['answered']),
        early_independent_s: sec(e['independent']),
        early_segments_fetched: e['early_segments_fetched'] ?? 0,
        early_bytes_fetched: e['early_bytes_fetched'] ?? 0,
      };
    } finally {
      await web.stop();
    }
  }
  console.log(
    `\nLean pair (the same customization, snapshot ${flags.join(' ')}): overlay ${fmtBytes(made.size)}, ` +
      `of which memory ${fmtBytes(memoryBytes)} → early start over nginx (limit_rate)`,
  );
  console.log(table(rows));
  return { overlay_bytes: made.size, memory_bytes: memoryBytes, links };
}
