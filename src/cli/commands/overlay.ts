/**
 * `overlay push | list | rm`: overlays stored in an OpenStack Glance (src/api/glance.ts,
 * docs/openstack.md). Synthesize one with `synthesize glance://IMAGE_ID --base …`.
 */
import type { Command } from 'commander';
import { listOverlays, pushOverlay, removeOverlay } from '../../api/glance.js';
import { GLANCE_HELP, visibilityOption } from '../glance-flags.js';
import { makeProgress } from '../progress.js';
import { bytes, printResult, table, type GlobalOptions } from '../output.js';

export function registerOverlay(program: Command): void {
  const overlay = program
    .command('overlay')
    .summary('overlays in OpenStack Glance (push, list, rm); synthesize them as glance://IMAGE_ID')
    .description(
      'Each overlay is one Glance image with cloudlet_type=overlay and cloudlet_base_id=<the base it was ' +
        'made for>. `synthesize glance://IMAGE_ID --base B` checks both before downloading it.',
    );

  overlay
    .command('push')
    .summary('upload an overlay file to Glance; prints its image id')
    .description(
      'Checks the overlay (header, footer, index) and streams it into a new Glance image. The upload is ' +
        'checked against what Glance stored; a failed one deletes its image.',
    )
    .argument('<file>', 'overlay file (from create)')
    .option('--name <name>', 'image name (default: the file name)')
    .option('--glance <url>', GLANCE_HELP)
    .addOption(visibilityOption())
    .addHelpText(
      'after',
      `
Example:
  cloudlet-overlay overlay push app.overlay --json     # {"image_id": "…", "url": "glance://…", …}
  cloudlet-overlay synthesize glance://IMAGE_ID --base demo --forward 8080:8080 --detach`,
    )
    .action(async (file: string, flags: { name?: string; glance?: string; visibility?: string }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await pushOverlay({
        file,
        endpoint: flags.glance,
        name: flags.name,
        visibility: flags.visibility,
        progress: makeProgress(g),
      });
      printResult(g, r, () => `pushed ${file} as ${r.url} (${bytes(r.size)}, for base ${r.base_id.slice(0, 12)})`);
    });

  overlay
    .command('list')
    .summary('list the overlays in Glance, all or those for one base')
    .option('--base <id>', 'only overlays made for this base (id; or a name or id prefix of a base in Glance)')
    .option('--glance <url>', GLANCE_HELP)
    .action(async (flags: { base?: string; glance?: string }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await listOverlays({ endpoint: flags.glance, base: flags.base });
      const list = r.overlays;
      printResult(g, r, () => {
        if (list.length === 0)
          return flags.base ? `no overlays for base ${flags.base} in Glance` : 'no overlays in Glance';
        const rows = [['image', 'name', 'base', 'size', 'status', 'created']];
        for (const o of list) {
          rows.push([
            o.url,
            o.name ?? '',
            (o.base_id ?? '').slice(0, 16),
            o.size === null ? '' : bytes(o.size),
            o.status,
            o.created_at.slice(0, 19),
          ]);
        }
        return table(rows);
      });
    });

  overlay
    .command('rm')
    .summary('delete an overlay image from Glance')
    .argument('<image>', 'glance://IMAGE_ID or the image UUID')
    .option('--glance <url>', GLANCE_HELP)
    .action(async (ref: string, flags: { glance?: string }, command: Command) => {
      const g = command.optsWithGlobals<GlobalOptions>();
      const r = await removeOverlay(ref, { endpoint: flags.glance });
      printResult(g, r, () => `deleted overlay image ${r.image_id}`);
    });
}
