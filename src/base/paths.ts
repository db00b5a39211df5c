/**
 * Where the base library lives and how it is laid out:
 *
 *   <root>/bases/<id>/        one imported base VM (immutable once renamed into place)
 *       manifest.json         ids, targets, digests, the VM spec a resume must match
 *       disk.<fmt>            the base disk (raw or qcow2, standalone)
 *       ram/<block>.raw       each RAM block as a page-aligned raw file, zero pages as holes;
 *                             the main block is the file a synthesized VM maps share=off
 *       stream/{prefix,start,tail}  the migration stream's header, RAM setup, device state
 *       maps/<kind>-<name>.map      chunk maps (sha256 of every non-zero chunk)
 *       maps/anchors.idx      content anchors (finds data moved by a non-multiple of 4 KiB)
 *       kernel, initrd        for direct-boot bases (the same option ROMs on resume)
 *   <root>/instances/<iid>/   one synthesized VM (src/instance): disk, memory, state.json, logs
 *   <root>/tmp/               imports and downloads in progress (same filesystem: rename)
 *
 * Root: --library DIR, else $CLOUDLET_LIBRARY, else $XDG_DATA_HOME/cloudlet-overlay
 * (~/.local/share/cloudlet-overlay).
 */
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { UsageError } from '../util/errors.js';
import { safeName } from '../util/safe-name.js';

export function libraryRoot(explicit?: string): string {
  if (explicit) return resolve(explicit);
  if (process.env.CLOUDLET_LIBRARY) return resolve(process.env.CLOUDLET_LIBRARY);
  const data = process.env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(data, 'cloudlet-overlay');
}

export const basesDir = (root: string): string => join(root, 'bases');
export const tmpDir = (root: string): string => join(root, 'tmp');

const ID = /^[0-9a-f]{64}$/;

export function baseDir(root: string, id: string): string {
  if (!ID.test(id)) throw new UsageError(`not a base id: ${id}`);
  return join(basesDir(root), id);
}

export const ANCHORS_FILE = join('maps', 'anchors.idx');

export function mapFile(kind: string, name: string): string {
  return join('maps', `${kind}-${safeName(name)}.map`);
}
