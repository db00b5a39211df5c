/**
 * `base push`, `base pull` and `base list --glance`: the base library against an OpenStack
 * Glance (src/api/glance.ts; docs/openstack.md).
 */
import type { Command } from 'commander';
import { libraryRoot } from '../../api/base.js';
import { listGlanceBases, pullBase, pushBase } from '../../api/glance.js';
import { GLANCE_HELP, visibilityOption } from '../glance-flags.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, table, type GlobalOptions } from '../output.js';

export function registerBaseGlance(base: Command): void {
  base
    .command('push')
    .summary('upload a base VM to Glance (one image: the base package, typed by properties)')
    .description(
      "Uploads what `base export` writes (the library's base directory as a sparse tar) as one Glance " +
        'image with cloudlet_type=base_package, cloudlet_base_id=<id> and the VM spec in brief. Nothing ' +
        'is uploaded when Glance already has a complete package of this base. The upload is streamed and ' +
        'checked against what Glance stored; a failed one deletes its image.',
    )
    .argument('<id>', 'base id, unique prefix or name')
    .option('--glance <url>', GLANCE_HELP)
    .addOption(visibilityOption())
    .addHelpText(
      'after',
      `
Example:
  cloudlet-overlay base push demo --glance http://controller:9292`,
    )
    .action(async (ref: string, flags: { glance?: string; visibility?: string }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await pushBase({
        root: libraryRoot(g.library),
        base: ref,
        endpoint: flags.glance,
        visibility: flags.visibility,
        progress: makeProgress(g),
      });
      printResult(g, r, () =>
        r.added ? `pushed base ${r.id} as ${r.url} (${bytes(r.size)})` : `already in Glance: base ${r.id} as ${r.url}`,
      );
    });

  base
    .command('pull')
    .summary('bring a base VM from Glance into the library, verified')
    .description(
      "Downloads a base package image, checks it against Glance's hash, and imports it like " +
        '`base import PACKAGE`: every file is checked against the base id before the base appears in ' +
        'the library. Nothing is downloaded when the library already has the base.',
    )
    .argument('<ref>', 'glance://IMAGE_ID, the image UUID, a base id (or unique prefix), or a base name')
    .option('--glance <url>', GLANCE_HELP)
    .addHelpText(
      'after',
      `
Examples:
  cloudlet-overlay base pull demo
  cloudlet-overlay base pull glance://4f7c1e8a-0d7e-4a59-9d0c-5b3c2f1e9a10`,
    )
    .action(async (ref: string, flags: { glance?: string }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await pullBase({
        root: libraryRoot(g.library),
        ref,
        endpoint: flags.glance,
        progress: makeProgress(g),
      });
      printResult(g, r, () => `${r.added ? 'pulled' : 'already present'}: base ${r.id} (image ${r.image_id})`);
    });
}

/** `base list --glance [URL]`. */
export async function printGlanceBases(g: GlobalOptions, glance: string | true): Promise<void> {
  const r = await listGlanceBases({ endpoint: glance === true ? undefined : glance });
  printResult(g, r, () => {
    if (r.bases.length === 0) return `no base VMs in Glance at ${r.glance}`;
    const rows = [['id', 'name', 'machine', 'memory', 'disk', 'package', 'image', 'created']];
    for (const b of r.bases) {
      rows.push([
        b.id.slice(0, 16),
        b.name ?? '',
        b.machine ?? '',
        b.memory_bytes === undefined ? '' : bytes(b.memory_bytes),
        b.disk_bytes === undefined ? '' : bytes(b.disk_bytes),
        b.size === null ? '' : bytes(b.size),
        b.image_id,
        b.created_at.slice(0, 19),
      ]);
    }
    return table(rows);
  });
}
