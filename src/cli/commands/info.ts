import type { Command } from 'commander';
import { overlayInfo } from '../../api/inspect.js';
import { bytes, printResult, table, type GlobalOptions } from '../output.js';

export function registerInfo(program: Command): void {
  program
    .command('info')
    .summary('show what an overlay holds: base id, targets, sizes, encodings')
    .argument('<overlay>', 'overlay file')
    .action(async (path: string, _flags: object, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await overlayInfo(path);
      printResult(g, r, () => {
        const rows = [['target', 'kind', 'size', 'changed chunks', 'digest']];
        for (const t of r.targets) {
          rows.push([
            t.name,
            t.kind,
            bytes(t.size),
            t.changed_chunks === undefined ? '' : String(t.changed_chunks),
            t.digest.slice(0, 16),
          ]);
        }
        const encRows = [['encoding', 'records', 'chunks', 'payload']];
        for (const [k, v] of Object.entries(r.encodings))
          encRows.push([k, String(v.records), String(v.chunks), bytes(v.bytes)]);
        return [
          `${r.path}: cloudlet-overlay ${r.format_version}, ${bytes(r.size)}, ${r.segments} segments, ` +
            `zstd level ${r.compression.level}`,
          `base ${r.base_id}`,
          `created ${r.created_at} by ${r.creator}` + (r.memory ? `; machine ${r.memory.machine}` : ''),
          `overlay / customized VM size: ${(r.ratio * 100).toFixed(2)} %`,
          '',
          table(rows),
          '',
          table(encRows),
        ].join('\n');
      });
    });
}
