import type { Command } from 'commander';
import { Option } from 'commander';
import { applyOverlay } from '../../api/apply.js';
import { baseOptions, baseRef, type BaseFlags } from '../base-flags.js';
import { makeProgress } from '../progress.js';
import { printResult, seconds, type GlobalOptions } from '../output.js';
import { intArg, threadsArg } from '../parse.js';
import { trust, trustOpt, type TrustFlags } from '../trust-flags.js';

interface ApplyFlags extends BaseFlags, TrustFlags {
  output: string;
  diskFormat: 'qcow2' | 'raw';
  memoryFormat?: 'sparse' | 'stream' | 'raw';
  baseRam?: string;
  clusterSize?: number;
  force?: boolean;
  threads?: number;
}

export function registerApply(program: Command): void {
  const cmd = program
    .command('apply')
    .summary('rebuild the customized VM (disk + memory) from a base and an overlay')
    .description(
      "Rebuild the customized VM from a base VM and an overlay, verify every target against the overlay's " +
        'checksums, and only then move the results into the output directory:\n' +
        '  disk.qcow2 (only changed clusters, the base disk as backing file) or disk.raw,\n' +
        '  memory.sparse (changed pages only; resumes on top of the base RAM file),\n' +
        '  memory.stream (a full QEMU migration stream) or memory/ (raw RAM blocks),\n' +
        '  manifest.json (what QEMU needs to resume it).',
    )
    .argument('<overlay>', 'overlay file');
  baseOptions(cmd)
    .requiredOption('-o, --output <dir>', 'output directory (created if missing)')
    .addOption(new Option('--disk-format <fmt>', 'disk output').choices(['qcow2', 'raw']).default('qcow2'))
    .addOption(
      new Option('--memory-format <fmt>', 'memory output (default: sparse with a library base, else stream)').choices([
        'sparse',
        'stream',
        'raw',
      ]),
    )
    .option(
      '--base-ram <file>',
      "the base's main RAM block as a raw file (for --memory-format sparse without a library)",
    )
    .addOption(new Option('--cluster-size <bytes>', 'qcow2 cluster size').argParser(intArg))
    .option('--force', 'replace outputs that already exist')
    .addOption(new Option('--threads <n>', 'decode threads (default: every core; 1: all on one)').argParser(threadsArg))
    .addOption(trustOpt())
    .action(async (overlay: string, flags: ApplyFlags, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await applyOverlay({
        overlay,
        base: { ...baseRef(flags), library: g.library },
        outDir: flags.output,
        diskFormat: flags.diskFormat,
        memoryFormat: flags.memoryFormat,
        baseRamFile: flags.baseRam,
        clusterSize: flags.clusterSize,
        force: flags.force,
        threads: flags.threads === 1 ? 0 : flags.threads,
        progress: makeProgress(g),
        trust: await trust(flags),
      });
      printResult(g, r, () => {
        const m = r.manifest;
        const lines = [`rebuilt and verified in ${seconds(r.timings_ms.total ?? 0)} → ${r.out_dir}`];
        if (m.disk) {
          const backing = m.disk.backing ? `, backing ${m.disk.backing.path}` : '';
          lines.push(`  disk    ${m.disk.path} (${m.disk.format}${backing})`);
        }
        if (m.memory) lines.push(`  memory  ${m.memory.path} (${m.memory.format}, machine ${m.memory.machine})`);
        return lines.join('\n');
      });
    });
}
