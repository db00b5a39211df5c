import type { Command } from 'commander';
import { Option } from 'commander';
import { createOverlay, DEFAULT_LEVEL } from '../../api/create.js';
import { baseOptions, baseRef, type BaseFlags } from '../base-flags.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, seconds, table, type GlobalOptions } from '../output.js';
import { intArg, threadsArg } from '../parse.js';
import { signingKey } from '../../api/keys.js';

interface CreateFlags extends BaseFlags {
  disk?: string;
  diskFormat?: string;
  memory?: string;
  output: string;
  level: number;
  tmpDir?: string;
  threads?: number;
  sign?: string;
  force?: boolean;
}

export function registerCreate(program: Command): void {
  const cmd = program
    .command('create')
    .summary('diff a customized VM against a base VM into an overlay file')
    .description(
      'Diff a customized VM (disk image and/or memory snapshot) against a base VM in 4 KiB chunks ' +
        '(zero chunks, chunks found anywhere in the base or earlier in the overlay, per-chunk deltas) ' +
        'and write one self-describing, compressed overlay file.',
    );
  baseOptions(cmd)
    .option('--disk <image>', 'customized disk image (raw, qcow2, … — a qcow2 on top of the base disk is fastest)')
    .option('--disk-format <fmt>', 'format of --disk (default: detected by qemu-img)')
    .option('--memory <file>', 'customized memory snapshot: QEMU migration stream or libvirt save image')
    .requiredOption('-o, --output <file>', 'overlay file to write (appears only when complete)')
    .addOption(
      new Option('--level <n>', 'zstd level of the overlay body, 1..22').default(DEFAULT_LEVEL).argParser(intArg),
    )
    .option('--tmp-dir <dir>', 'scratch space for converted disk views (default: system temp)')
    .addOption(
      new Option(
        '--threads <n>',
        'threads (default: every core; 1: all on one); the overlay is the same for any number',
      ).argParser(threadsArg),
    )
    .option('--sign <key>', 'sign the overlay with this private key (NAME.key from `key generate`)')
    .option('--force', 'replace the output file if it exists')
    .addHelpText(
      'after',
      `
Examples:
  cloudlet-overlay create --base-disk base.qcow2 --base-memory base.mem \\
      --disk custom.qcow2 --memory custom.mem -o app.overlay
  cloudlet-overlay create --base 3f2a… --disk custom.qcow2 -o disk-only.overlay`,
    )
    .action(async (flags: CreateFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await createOverlay({
        base: { ...baseRef(flags), library: g.library },
        disk: flags.disk,
        diskFormat: flags.diskFormat,
        memory: flags.memory,
        output: flags.output,
        level: flags.level,
        tmpDir: flags.tmpDir,
        threads: flags.threads,
        progress: makeProgress(g),
        sign: await signingKey(flags.sign),
        force: flags.force,
      });
      printResult(g, r, () => {
        const rows = [['target', 'kind', 'size', 'changed chunks']];
        for (const t of r.targets) {
          rows.push([t.name, t.kind, bytes(t.size), String(r.stats.targets[t.name]?.changedChunks ?? '')]);
        }
        const enc = Object.entries(r.stats.encodings)
          .map(([k, v]) => `${k} ${v.chunks}`)
          .join(', ');
        const took = seconds(r.timings_ms.total ?? 0);
        return (
          `overlay ${r.path}: ${bytes(r.size)} for base ${r.base_id.slice(0, 12)} in ${took}\n` +
          table(rows) +
          `\nchunks by encoding: ${enc || 'none (identical to the base)'}`
        );
      });
    });
}
