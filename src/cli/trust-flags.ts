/**
 * `--trust PUBKEY` (repeatable), shared by the commands that read overlays and packages: with
 * any trusted key (these, plus the trust store directory), unsigned or wrongly signed input is
 * refused with exit code 13.
 */
import { Option, type Command } from 'commander';
import { trustedKeys, type TrustedKey } from '../api/keys.js';
import { collect } from './parse.js';

export interface TrustFlags {
  trust?: string[];
}

export function trustOption(cmd: Command): Command {
  return cmd.addOption(trustOpt());
}

export function trust(flags: TrustFlags): Promise<TrustedKey[]> {
  return trustedKeys(flags.trust);
}

/** The --trust option, to add to a command with addOption(). */
export function trustOpt(): Option {
  return new Option(
    '--trust <pubkey>',
    'trust this public key (NAME.pub, repeatable; also every *.pub in $XDG_CONFIG_HOME/cloudlet-overlay/trusted): ' +
      'then unsigned or wrongly signed input is refused',
  ).argParser(collect);
}
