/**
 * npm run bench: the realistic pair (scripts/bench/realistic.ts: Debian 12, 512 MiB, 2 GiB, numpy
 * installed in the resumed base — create, synthesis pipeline vs sequential vs QEMU alone, throttled
 * links), then the small demo pair (the demo base with tens of MB of files written and a program
 * started, resumed from the base snapshot), side by side:
 *   - our overlay (size, create time, per-encoding breakdown, encoder ablations, zstd levels)
 *   - xdelta3 -e -s over the whole disk and memory stream (the original prototype's baseline)
 *   - qemu-img rebase + zstd-compressed qcow2 (disk only)
 *   - casync make with the base in the store (disk + memory)
 *   - apply, and synthesize → first HTTP answer split by phase, sparse vs full stream
 * Prints tables; docs/BENCHMARKS.md records a run.
 * Then the semantic gap (scripts/bench/semantic.ts: trim, free blocks, free memory on the Debian pair).
 * Usage: npm run bench [-- --keep] [--small | --realistic | --semantic] [--runs=N]
 *        [--quick (no xdelta3 on 2.5 GB, no lean pair, no init_on_free pair)]
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { bootDemoVm, ensureDemoVm, freePort, parseStatus } from '../test/helpers/demo-vm.js';
import { cli } from '../test/helpers/cli.js';
import { createOverlay } from '../src/api/create.js';
import { dirBytes, fmtBytes, median, must, size, table, timed } from './bench/util.js';
import { realisticBench } from './bench/realistic.js';
import { semanticBench } from './bench/semantic.js';
import { applyOverlay } from '../src/api/apply.js';
import { synthesize } from '../src/api/synthesize.js';
import { openLibraryBase } from '../src/base/open.js';
import type { DiffOptions } from '../src/delta/diff.js';

const exec = promisify(execFile);
const MiB = 2 ** 20;

/** The small demo pair: sizes against the peers, levels, ablations, synthesis phases. */
async function smallBench(work: string): Promise<void> {
  const root = join(work, 'lib');
  const env = { ...process.env, CLOUDLET_LIBRARY: root };
  {
    await ensureDemoVm();
    // Base: boot, snapshot to a directory (peers need the base stream), import.
    const booted = await bootDemoVm({ workDir: join(work, 'boot') });
    const baseStatus = parseStatus(await (await fetch(booted.statusUrl)).text());
    await booted.vm.qmp.close();
    must(
      await cli(['snapshot', '--qmp', booted.vm.paths.qmpSocket, '-o', join(work, 'base'), '--then', 'quit'], env),
      'base snapshot',
    );
    await booted.vm.waitExit(10_000).catch(() => booted.vm.kill());
    must(await cli(['base', 'import', join(work, 'base'), '--name', 'bench'], env), 'base import');

    // Customize: tens of MB of files (text, binaries, random, a compressed archive) and a program.
    const p0 = await freePort();
    const launched = must(await cli(['launch', 'bench', '--forward', `${p0}:8080`], env), 'launch');
    const iid = String(launched.instance);
    const script = [
      'mkdir -p /mnt/app /mnt/data',
      'seq 1 1500000 > /mnt/data/numbers.txt',
      'cp -a /lib/modules /mnt/app/modules',
      'cp /bin/busybox /mnt/app/busybox',
      'dd if=/dev/urandom of=/mnt/data/random.bin bs=1M count=6 2>/dev/null',
      'gzip -c /mnt/data/numbers.txt > /mnt/data/numbers.gz',
      'for i in 1 2 3 4 5 6; do cat /mnt/app/busybox >> /mnt/data/blob.bin; done',
      'echo bench-app > /mnt/marker',
      '(setsid sh -c \'n=0; while :; do n=$((n+1)); echo "bench-app ticks=$n" > /tmp/app-state; sleep 1; done\' ' +
        '</dev/null >/dev/null 2>&1 &)',
      'sync',
      'du -sk /mnt | cut -f1',
    ].join(' && ');
    const cust = must(await cli(['console', iid, '--run', script, '--timeout', '300s'], env), 'customize');
    const writtenKiB = Number(String(cust.output).trim().split('\n').pop());
    must(
      await cli(['snapshot', '--instance', iid, '-o', join(work, 'custom'), '--then', 'quit'], env),
      'custom snapshot',
    );
    must(await cli(['stop', iid], env), 'stop');

    const baseDisk = join(work, 'base', 'disk.raw');
    const baseMem = join(work, 'base', 'memory.stream');
    const custQcow = join(work, 'custom', 'disk.qcow2');
    const custMem = join(work, 'custom', 'memory.stream');
    const custRaw = join(work, 'custom-disk.raw');
    await exec('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', custQcow, custRaw]);
    const diskBytes = await size(custRaw);
    const memBytes = await size(custMem);
    console.log(
      `\nVM pair: demo guest (128 MiB RAM, 64 MiB disk), ${writtenKiB} KiB used on its disk after customization`,
    );
    console.log(`customized: memory stream ${fmtBytes(memBytes)}, disk ${fmtBytes(diskBytes)} (virtual)\n`);

    // ---- ours ------------------------------------------------------------------------------
    const base = await openLibraryBase(root, must(await cli(['base', 'show', 'bench'], env), 'show').id as string);
    const ours = async (name: string, level: number, encoders: Partial<DiffOptions> = {}) => {
      const out = join(work, `${name}.overlay`);
      const [r, ms] = await timed(() =>
        createOverlay({ base, disk: custQcow, memory: custMem, output: out, level, encoders }),
      );
      return { name, size: r.size, ms, stats: r.stats, path: out };
    };
    const levels = [];
    for (const l of [3, 9, 19]) levels.push(await ours(`ours-l${l}`, l));
    const def = levels[1]!;
    const ablations = [
      await ours('no-xdelta3', 9, { xdelta3: false }),
      await ours('no-xor', 9, { xor: false }),
      await ours('no-zstd-dict', 9, { zstdDict: false }),
      await ours('no-self-ref', 9, { selfRefs: false }),
      await ours('no-shifted', 9, { shifted: false }),
      await ours('no-self-ref-no-shifted', 9, { selfRefs: false, shifted: false }),
      await ours('no-base-ref', 9, { baseRefs: false }),
      await ours('raw-only', 9, { xdelta3: false, xor: false, zstdDict: false }),
    ];
    const [, applySparseMs] = await timed(() =>
      applyOverlay({ overlay: def.path, base, outDir: join(work, 'apply-sparse'), memoryFormat: 'sparse' }),
    );
    const [, applyStreamMs] = await timed(() =>
      applyOverlay({ overlay: def.path, base, outDir: join(work, 'apply-stream'), memoryFormat: 'stream' }),
    );
    const cliCreate = await timed(() =>
      cli(['create', '--base', 'bench', '--disk', custQcow, '--memory', custMem, '-o', join(work, 'cli.overlay')], env),
    );
    must(cliCreate[0], 'cli create');

    // ---- peers ----------------------------------------------------------------------------
    const xd = async (src: string, dst: string, out: string): Promise<number> => {
      const [, ms] = await timed(() =>
        exec('xdelta3', [
          '-e',
          '-f',
          '-B',
          String(Math.min(2 ** 31 - 1, Math.max(diskBytes, memBytes) + MiB)),
          '-s',
          src,
          dst,
          out,
        ]),
      );
      return ms;
    };
    const xdDiskMs = await xd(baseDisk, custRaw, join(work, 'disk.vcdiff'));
    const xdMemMs = await xd(baseMem, custMem, join(work, 'mem.vcdiff'));
    const xdSize = (await size(join(work, 'disk.vcdiff'))) + (await size(join(work, 'mem.vcdiff')));
    const [, xdDecodeMs] = await timed(async () => {
      await exec('xdelta3', ['-d', '-f', '-s', baseDisk, join(work, 'disk.vcdiff'), join(work, 'disk.out')]);
      await exec('xdelta3', ['-d', '-f', '-s', baseMem, join(work, 'mem.vcdiff'), join(work, 'mem.out')]);
    });

    const top = join(work, 'top.qcow2');
    const [, qiMs] = await timed(async () => {
      await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', custRaw, '-F', 'raw', top]);
      await exec('qemu-img', ['rebase', '-f', 'qcow2', '-b', baseDisk, '-F', 'raw', top]);
      await exec('qemu-img', [
        'convert',
        '-f',
        'qcow2',
        '-O',
        'qcow2',
        '-c',
        '-o',
        'compression_type=zstd',
        '-B',
        baseDisk,
        '-F',
        'raw',
        top,
        join(work, 'delta.qcow2'),
      ]);
    });
    const qiSize = await size(join(work, 'delta.qcow2'));

    const store = join(work, 'store.castr');
    await mkdir(store);
    await exec('casync', ['make', `--store=${store}`, join(work, 'b-disk.caibx'), baseDisk]);
    await exec('casync', ['make', `--store=${store}`, join(work, 'b-mem.caibx'), baseMem]);
    const storeBase = await dirBytes(store);
    const [, caMs] = await timed(async () => {
      await exec('casync', ['make', `--store=${store}`, join(work, 'c-disk.caibx'), custRaw]);
      await exec('casync', ['make', `--store=${store}`, join(work, 'c-mem.caibx'), custMem]);
    });
    const caSize =
      (await dirBytes(store)) -
      storeBase +
      (await size(join(work, 'c-disk.caibx'))) +
      (await size(join(work, 'c-mem.caibx')));

    console.log('Overlay of the customized VM (disk + memory) — smaller is better');
    const rows = [['method', 'size', 'vs ours', 'make (ms)', 'notes']];
    rows.push([
      'cloudlet-overlay (level 9, default)',
      fmtBytes(def.size),
      '1.00',
      def.ms.toFixed(0),
      `apply: sparse ${applySparseMs.toFixed(0)} ms, full stream ${applyStreamMs.toFixed(0)} ms; ` +
        `CLI wall ${cliCreate[1].toFixed(0)} ms`,
    ]);
    rows.push([
      'xdelta3 -e -s (disk + memory stream)',
      fmtBytes(xdSize),
      (xdSize / def.size).toFixed(2),
      (xdDiskMs + xdMemMs).toFixed(0),
      `decode ${xdDecodeMs.toFixed(0)} ms`,
    ]);
    rows.push([
      'qemu-img rebase + zstd qcow2 (disk only)',
      fmtBytes(qiSize),
      (qiSize / def.size).toFixed(2),
      qiMs.toFixed(0),
      'no memory',
    ]);
    rows.push([
      'casync make, base in store (disk + memory)',
      fmtBytes(caSize),
      (caSize / def.size).toFixed(2),
      caMs.toFixed(0),
      'new chunks + indexes',
    ]);
    console.log(table(rows));

    console.log('\nOurs by zstd level');
    console.log(
      table([['level', 'size', 'create (ms)'], ...levels.map((l) => [l.name, fmtBytes(l.size), l.ms.toFixed(0)])]),
    );

    console.log('\nOurs with one encoder switched off (level 9)');
    console.log(
      table([
        ['variant', 'size', 'vs default', 'create (ms)'],
        ...ablations.map((a) => [a.name, fmtBytes(a.size), (a.size / def.size).toFixed(3), a.ms.toFixed(0)]),
      ]),
    );

    console.log('\nChunks by encoding (default run)');
    console.log(
      table([
        ['encoding', 'records', 'chunks', 'payload'],
        ...Object.entries(def.stats.encodings).map(([k, v]) => [
          k,
          String(v.records),
          String(v.chunks),
          fmtBytes(v.bytes),
        ]),
      ]),
    );
    console.log(
      table([
        ['target', 'data chunks', 'changed chunks'],
        ...Object.entries(def.stats.targets)
          .filter(([, v]) => v.kind !== 'blob')
          .map(([k, v]) => [k, String(v.dataChunks), String(v.changedChunks)]),
      ]),
    );
    await base.close();

    // ---- synthesis ------------------------------------------------------------------------
    console.log('\nSynthesize → first HTTP answer (ms; median of 3; in-process API, QEMU under TCG)');
    const phases = ['open_base', 'open_overlay', 'apply', 'qemu_start', 'incoming_load', 'first_response', 'total'];
    const results: Record<string, Record<string, number[]>> = {};
    for (const memoryFormat of ['sparse', 'stream'] as const) {
      results[memoryFormat] = {};
      for (let i = 0; i < 3; i++) {
        const port = await freePort();
        const s = await synthesize({
          root,
          base: 'bench',
          overlay: def.path,
          forwards: [{ hostPort: port, guestPort: 8080 }],
          waitHttp: `http://127.0.0.1:${port}/cgi-bin/status`,
          memoryFormat,
        });
        const st = parseStatus(s.result.answer!.body);
        if (st.token !== baseStatus.token || !st.app.startsWith('bench-app'))
          throw new Error('synthesized VM is not the customized one');
        for (const p of phases) (results[memoryFormat][p] ??= []).push(s.result.timings_ms[p] ?? 0);
        await s.vm.stop();
        await rm(s.state.dir, { recursive: true, force: true });
      }
    }
    console.log(
      table([
        ['phase', 'sparse (ours)', 'full stream'],
        ...phases.map((p) => [p, String(median(results.sparse![p]!)), String(median(results.stream![p]!))]),
      ]),
    );
    const cliRun = await timed(async () => {
      const port = await freePort();
      const r = must(
        await cli(
          [
            'synthesize',
            def.path,
            '--base',
            'bench',
            '--forward',
            `${port}:8080`,
            '--wait-http',
            `http://127.0.0.1:${port}/cgi-bin/status`,
            '--detach',
          ],
          env,
        ),
        'cli synthesize',
      );
      return r;
    });
    console.log(`CLI synthesize --detach, wall clock incl. Node start: ${cliRun[1].toFixed(0)} ms`);
    must(await cli(['stop', String(cliRun[0].instance)], env), 'stop');
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const keep = args.includes('--keep');
  const only = args.find((a) => a === '--small' || a === '--realistic' || a === '--semantic');
  const runs = Number(args.find((a) => a.startsWith('--runs='))?.slice(7) ?? 3);
  const work = await mkdtemp(join(tmpdir(), 'clo-bench-'));
  console.error(`bench: working in ${work}`);
  const summary: Record<string, unknown> = { date: new Date().toISOString() };
  try {
    if (only === undefined || only === '--realistic')
      summary['realistic'] = await realisticBench({ work, runs, quick: args.includes('--quick') });
    if (only === undefined || only === '--semantic') {
      summary['semantic'] = await semanticBench({
        work,
        runs: Math.min(runs, 3),
        initOnFree: !args.includes('--quick'),
      });
    }
    if (only === undefined || only === '--small') await smallBench(work);
    await writeFile(join(work, 'bench.json'), JSON.stringify(summary, null, 2) + '\n');
    console.log(`\nbench: results in ${join(work, 'bench.json')}${keep ? '' : ' (removed: pass --keep)'}`);
  } finally {
    if (!keep) await rm(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
