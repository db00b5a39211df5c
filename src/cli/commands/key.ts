import type { Command } from 'commander';
import { generateKey } from '../../api/keys.js';
import { printResult, type GlobalOptions } from '../output.js';

export function registerKey(program: Command): void {
  const key = program
    .command('key')
    .summary('signing keys: generate a key pair (ed25519)')
    .description(
      'Overlays (create --sign) and base packages (base export --sign) can be signed; readers given ' +
        '--trust NAME.pub, or with NAME.pub in $XDG_CONFIG_HOME/cloudlet-overlay/trusted/, refuse unsigned ' +
        'or wrongly signed input (exit code 13).',
    );
  key
    .command('generate')
    .summary('write NAME.key (private, mode 0600) and NAME.pub (public)')
    .argument('<name>', 'path prefix of the key files; its last part is the signer name')
    .option('--force', 'replace key files that exist')
    .action(async (name: string, flags: { force?: boolean }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await generateKey(name, flags.force);
      printResult(
        g,
        r,
        () =>
          `wrote ${r.private_key} (keep it secret) and ${r.public_key}; key id ${r.key_id}\n` +
          `to trust it on a cloudlet: copy ${r.public_key} into ${r.trust_store}/ (or pass --trust ${r.public_key})`,
      );
    });
}
