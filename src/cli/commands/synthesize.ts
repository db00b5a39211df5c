import type { Command } from 'commander';
import { Option } from 'commander';
import { libraryRoot } from '../../api/base.js';
import { runSynthesis, type SynthesizeResult } from '../../api/synthesize.js';
import type { AccelChoice, PortForward } from '../../api/types.js';
import { makeProgress } from '../progress.js';
import { printResult, table, type GlobalOptions } from '../output.js';
import { QEMU_ARG_HELP, collect, durationArg, forwardArg, intArg, sizeArg, threadsArg } from '../parse.js';
import { trust, trustOpt, type TrustFlags } from '../trust-flags.js';
import { onForegroundSignal } from '../signals.js';

interface SynthesizeFlags extends TrustFlags {
  qemuArg?: string[];
  maxSize?: number;
  idleTimeout?: number;
  base: string;
  glance?: string;
  forward: PortForward[];
  waitHttp?: string;
  waitTcp?: number;
  accel: AccelChoice;
  detach?: boolean;
  keep?: boolean;
  timeout: number;
  memory: 'sparse' | 'stream';
  threads?: number;
  pipeline: 'stream' | 'sequential';
  launcher: 'auto' | 'libvirt' | 'qemu';
  earlyStart?: boolean;
}

const PHASES: Array<[string, string]> = [
  ['open_base', 'open base'],
  ['resolve', 'resolve glance image'],
  ['open_overlay', 'open + check overlay header'],
  ['qemu_start', 'QEMU start (concurrent)'],
  ['rebuild', 'stream + rebuild + verify (memory into QEMU)'],
  ['load_wait', 'QEMU finishes loading'],
  ['disk_switch', 'disk onto the rebuilt layer'],
  ['fetch', 'fetch overlay (sequential)'],
  ['apply', 'rebuild + verify (sequential)'],
  ['incoming_load', 'memory load (sequential)'],
  ['first_response', 'first response'],
  ['total', 'total'],
];

export function registerSynthesize(program: Command): void {
  program
    .command('synthesize')
    .summary('rebuild a customized VM from a base + overlay and resume it until it answers')
    .description(
      "VM synthesis in one pipeline: QEMU starts at once, paused, with the base's exact machine and " +
        'devices (KVM when usable, else TCG); the overlay is read front to back (file or URL, at link ' +
        'speed; a dropped download resumes), decoded on every core, and its memory pages flow into QEMU as ' +
        'they are rebuilt (changed pages over the base RAM file, mapped copy-on-write) while the disk is ' +
        'rebuilt as a qcow2 over the base disk. The VM only runs once every checksum of the overlay is ' +
        'proven; a damaged overlay leaves no VM and no files. Without --detach it runs until Ctrl-C, then ' +
        'stops the VM and removes the instance (unless --keep).',
    )
    .argument('<overlay>', 'overlay file, http(s) URL, or glance://IMAGE_ID (see docs/openstack.md)')
    .requiredOption('--base <id>', 'base VM from the library (id, unique id prefix, or name)')
    .option('--glance <url>', 'Glance endpoint for glance:// overlays (default: $CLOUDLET_GLANCE_URL, OS_*)')
    .addOption(
      new Option(
        '--forward <spec>',
        'port forward tcp:127.0.0.1:HOSTPORT-:GUESTPORT or HOSTPORT:GUESTPORT (repeatable)',
      )
        .argParser(forwardArg)
        .default([]),
    )
    .option('--wait-http <url>', 'ready = this URL answers with a real HTTP response (e.g. http://127.0.0.1:8080/)')
    .addOption(
      new Option('--wait-tcp <port>', 'ready = a TCP connection to this host port stays open').argParser(intArg),
    )
    .addOption(
      new Option('--accel <accel>', 'accelerator: probe KVM, or force one')
        .choices(['auto', 'kvm', 'tcg'])
        .default('auto'),
    )
    .option('--detach', 'leave the VM running and print the instance id (see: ps, stop, logs)')
    .option('--keep', 'keep the instance directory (disk, memory, logs) when the VM stops')
    .addOption(
      new Option('--timeout <duration>', 'how long to wait for the first answer')
        .argParser(durationArg)
        .default(60_000, '60s'),
    )
    .addOption(
      new Option('--memory <how>', 'resume from changed pages over the base RAM file, or a full stream')
        .choices(['sparse', 'stream'])
        .default('sparse'),
    )
    .addOption(new Option('--threads <n>', 'decode threads (default: every core; 1: all on one)').argParser(threadsArg))
    .addOption(
      new Option(
        '--pipeline <how>',
        'stream: QEMU loads memory while the overlay arrives; sequential: rebuild into files first (for comparison)',
      )
        .choices(['stream', 'sequential'])
        .default('stream'),
    )
    .option(
      '--early-start',
      'run the VM as soon as its memory is proven; its disk is served from here while the rest of the ' +
        'overlay arrives (needs a file or a URL that answers Range requests); returns once the VM needs ' +
        'this process no more',
    )
    .addOption(
      new Option(
        '--launcher <who>',
        'who runs QEMU: a libvirt domain, our own child, or libvirt when its daemon answers',
      )
        .choices(['auto', 'libvirt', 'qemu'])
        .default('auto'),
    )
    .addOption(trustOpt())
    .addOption(new Option('--qemu-arg <arg>', QEMU_ARG_HELP).argParser(collect))
    .addOption(
      new Option('--max-size <bytes>', 'for a URL: refuse a download larger than this (e.g. 2G)')
        .argParser(sizeArg)
        .default(undefined, '32G'),
    )
    .addOption(
      new Option('--idle-timeout <duration>', 'for a URL: give up when the server sends nothing for this long')
        .argParser(durationArg)
        .default(undefined, '30s'),
    )
    .addHelpText(
      'after',
      `
Example:
  cloudlet-overlay synthesize app.overlay --base web --forward 8080:8080 \\
      --wait-http http://127.0.0.1:8080/ --detach`,
    )
    .action(async (overlay: string, flags: SynthesizeFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const human = !g.json && !g.quiet;
      const stop = new AbortController();
      await runSynthesis({
        root: libraryRoot(g.library),
        base: flags.base,
        overlay,
        glance: flags.glance,
        forwards: flags.forward,
        waitHttp: flags.waitHttp,
        waitTcp: flags.waitTcp,
        accel: flags.accel,
        detach: flags.detach,
        keep: flags.keep,
        readyTimeoutMs: flags.timeout,
        memoryFormat: flags.memory,
        threads: flags.threads === 1 ? 0 : flags.threads,
        pipeline: flags.pipeline,
        launcher: flags.launcher,
        earlyStart: flags.earlyStart,
        progress: makeProgress(g),
        trust: await trust(flags),
        fetch: { maxBytes: flags.maxSize, idleMs: flags.idleTimeout },
        qemuArgs: flags.qemuArg,
        signal: stop.signal,
        onReady(result) {
          if (human) process.stderr.write(phaseTable(result) + '\n');
          printResult(g, result, () => summary(result));
          if (flags.detach) return;
          // From here Ctrl-C is the normal end of a foreground VM (it stops it), not an interruption.
          onForegroundSignal(() => stop.abort());
          if (human) process.stderr.write('running in the foreground: Ctrl-C stops the VM\n');
        },
      });
    });
}

function phaseTable(result: SynthesizeResult): string {
  const rows = [['phase', 'ms']];
  for (const [k, label] of PHASES)
    if (result.timings_ms[k] !== undefined) rows.push([label, String(result.timings_ms[k])]);
  return table(rows);
}

function summary(result: SynthesizeResult): string {
  const lines = [
    `instance ${result.instance} running (pid ${result.pid}, ${result.accel}) from base ${result.base_id.slice(0, 12)}`,
  ];
  for (const f of result.forwards)
    lines.push(`  ${f.hostAddr ?? '127.0.0.1'}:${f.hostPort} → guest port ${f.guestPort}`);
  if (result.answer) lines.push(`first answer: HTTP ${result.answer.status}`, result.answer.body.trimEnd());
  return lines.join('\n');
}
