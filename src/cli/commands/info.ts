import type { Command } from 'commander';
import { overlayInfo } from '../../api/inspect.js';
import { bytes, printResult, table, type GlobalOptions } from '../output.js';
import { trust, trustOption, type TrustFlags } from '../trust-flags.js';
import type { InfoResult } from '../../api/inspect.js';

export function registerInfo(program: Command): void {
  const cmd = program
    .command('info')
    .summary('show what an overlay holds: base id, targets, sizes, encodings, who signed it')
    .argument('<overlay>', 'overlay file');
  trustOption(cmd).action(async (path: string, flags: TrustFlags, command: Command) => {
    const g = command.optsWithGlobals<GlobalOptions>();
    const r = await overlayInfo(path, await trust(flags));
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
        signedBy(r.signature),
        `overlay / customized VM size: ${(r.ratio * 100).toFixed(2)} %`,
        '',
        table(rows),
        '',
        table(encRows),
      ].join('\n');
    });
  });
}

function signedBy(s: InfoResult['signature']): string {
  const who = `key ${s.key_id?.slice(0, 16) ?? ''}${s.signer !== undefined ? ` (${JSON.stringify(s.signer)})` : ''}`;
  switch (s.status) {
    case 'unsigned':
      return 'not signed';
    case 'verified':
      return `signed by ${who}: verified with trusted key ${s.trusted_as ?? ''}`;
    case 'bad':
      return `signed by ${who}: BAD SIGNATURE (tampered or damaged)`;
    case 'untrusted_key':
      return `signed by ${who}: not a trusted key`;
    case 'unverified':
      return `signed by ${who} (not verified: no trusted key configured)`;
  }
}
