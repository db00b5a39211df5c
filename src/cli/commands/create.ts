import type { Command } from 'commander';
import { Option } from 'commander';
import { createOverlay, DEFAULT_LEVEL, type FreeBlocksMode } from '../../api/create.js';
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
  freeBlocks: FreeBlocksMode;
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
    .addOption(
      new Option(
        '--free-blocks <mode>',
        'leave out disk chunks in blocks the guest file system marks free (rebuilt as the base, or zero): ' +
          'auto = only where the on-disk bitmaps can be trusted (snapshot --freeze, an unmounted or read-only ' +
          'file system; else exact), ext4 = the same but an error when none is trusted, off = exact disk',
      )
        .choices(['off', 'auto', 'ext4'])
        .default('off'),
    )
    .addHelpText(
      'after',
      `
Free blocks: a live snapshot's ext4 is trusted only when frozen — take it with
  cloudlet-overlay snapshot --instance ID --freeze -o ./custom
then create ... --free-blocks auto. \`sync\` is not enough (the journal still holds the truth); an
untrusted file system is reported (--json: free_blocks) and kept exact. Or trim instead
(snapshot --trim): trimmed blocks become zero clusters and cost nothing without this flag.

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
        freeBlocks: flags.freeBlocks,
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
        const fb = r.free_blocks;
        const free = fb
          ? `\nfree blocks (${fb.mode}): ` +
            (fb.file_systems.length === 0
              ? 'no ext2/3/4 file system found'
              : fb.file_systems
                  .map(
                    (f) =>
                      `${f.type} ${f.trusted ? `trusted, ${bytes(f.free_bytes)} free` : `not trusted (${f.reason})`}`,
                  )
                  .join('; ')) +
            `; ${fb.chunks_left_out} chunks left out`
          : '';
        return (
          `overlay ${r.path}: ${bytes(r.size)} for base ${r.base_id.slice(0, 12)} in ${took}\n` +
          table(rows) +
          `\nchunks by encoding: ${enc || 'none (identical to the base)'}` +
          free
        );
      });
    });
}
