/**
 * OpenStack Glance as a store of cloudlet images (docs/openstack.md has the layout and why):
 *
 *   base package   one image per base VM: the `base export` package (a sparse tar of the
 *                  library's base directory), cloudlet_type=base_package,
 *                  cloudlet_base_id=<sha256>, and a summary of the VM spec as properties
 *   overlay        one image per overlay file, cloudlet_type=overlay, cloudlet_base_id=<sha256>
 *
 * The operations the CLI offers: base push / pull / list --glance, overlay push / list / rm.
 * Every upload is streamed and checked afterwards against what Glance says it stored (size and
 * hash); a failed or interrupted upload deletes its image, so only complete images stay
 * (status active). A pulled base is checked against Glance's hash, then verified byte for byte
 * like `base import` of a package. (`synthesize glance://ID` resolves its overlay with
 * glance/overlays.ts' resolveOverlaySource.)
 */
import { createReadStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { basename } from 'node:path';
import { exportStream, removeBase, resolveBaseId, showBase } from '../base/library.js';
import { importPackage } from '../base/package.js';
import { loadTrustedKeys } from '../util/sign.js';
import { tmpDir } from '../base/paths.js';
import { findBaseImage, findBasePackage, listBasePackages, packageBaseId, uploadBasePackage } from '../glance/bases.js';
import type { GlanceBase } from '../glance/bases.js';
import type { SessionOptions } from '../glance/auth.js';
import { glanceRef, openGlance, prop, sha256Of } from '../glance/image.js';
import {
  listOverlays as listOverlayImages,
  removeOverlay as removeOverlayImage,
  uploadOverlay,
  type GlanceOverlay,
} from '../glance/overlays.js';
import { fetchToFile } from '../net/fetch.js';
import { OverlayReader } from '../overlay/reader.js';
import { CorruptInputError, NetworkError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';

export type { GlanceBase } from '../glance/bases.js';
export type { GlanceOverlay } from '../glance/overlays.js';

/** Where Glance is (--glance; else $CLOUDLET_GLANCE_URL, $OS_IMAGE_URL or keystone's catalog). */
export interface GlanceOptions {
  endpoint?: string;
  /** The environment to read OS_* from (default: process.env). */
  env?: NodeJS.ProcessEnv;
}

/** A base package is as large as the base (GiBs): no overall deadline, only the idle timeout. */
const PACKAGE_TIMEOUT_MS = 24 * 3600_000;

function session(opts: GlanceOptions): SessionOptions {
  return { endpoint: opts.endpoint, env: opts.env };
}

export interface BaseListGlanceMessage {
  message_type: 'base_list';
  glance: string;
  bases: GlanceBase[];
}

/** `base list --glance`: the complete base packages in Glance, newest first. */
export async function listGlanceBases(opts: GlanceOptions = {}): Promise<BaseListGlanceMessage> {
  const client = await openGlance(session(opts));
  return { message_type: 'base_list', glance: client.endpoint, bases: await listBasePackages(client) };
}

export interface BasePushMessage {
  message_type: 'base_push';
  id: string;
  name?: string;
  image_id: string;
  url: string;
  glance: string;
  /** False when Glance already held a complete package of this base (nothing uploaded). */
  added: boolean;
  size: number;
  sha256?: string;
}

export interface BasePushOptions extends GlanceOptions {
  root: string;
  /** Base id, unique id prefix or name in the library. */
  base: string;
  visibility?: string;
  progress?: Progress;
}

/** `base push`: uploads a library base as one package image, unless Glance already has it. */
export async function pushBase(opts: BasePushOptions): Promise<BasePushMessage> {
  const { root } = opts;
  const id = await resolveBaseId(root, opts.base);
  const m = await showBase(root, id);
  const client = await openGlance(session(opts));
  const result = { message_type: 'base_push' as const, id, name: m.name, glance: client.endpoint };
  const existing = await findBasePackage(client, id);
  if (existing) {
    const { id: image_id, size } = existing;
    return { ...result, image_id, url: glanceRef(image_id), added: false, size: size ?? 0, sha256: sha256Of(existing) };
  }
  const vm = m.vm;
  const up = await uploadBasePackage(
    client,
    {
      baseId: id,
      name: m.name,
      machine: m.memory?.machine ?? vm?.machine,
      memoryBytes: m.memory ? m.targets.filter((t) => t.kind === 'ram').reduce((n, t) => n + t.size, 0) : undefined,
      diskBytes: m.disk?.virtual_size,
      memoryMiB: vm?.memoryMiB,
      cpu: vm?.cpu,
      smp: vm?.smp,
      directBoot: vm ? Boolean(vm.kernel) : undefined,
      nic: vm?.network?.model,
      qemuVersion: m.qemu_version,
    },
    {
      data: () => exportStream(root, id),
      total: m.stored_bytes,
      visibility: opts.visibility,
      progress: opts.progress ?? silent,
    },
  );
  return { ...result, image_id: up.id, url: glanceRef(up.id), added: true, size: up.bytes, sha256: up.sha256 };
}

export interface BasePullMessage {
  message_type: 'base_pull';
  id: string;
  name?: string;
  image_id: string;
  glance: string;
  /** False when the library already had the base (nothing downloaded). */
  added: boolean;
}

export interface BasePullOptions extends GlanceOptions {
  root: string;
  /** glance://IMAGE_ID, the image UUID, a base id (or unique prefix) or a base name in Glance. */
  ref: string;
  progress?: Progress;
}

/**
 * `base pull`: brings a base package from Glance into the library. The download is checked
 * against Glance's hash and the package verified like `base import` (every file against the
 * base id) before it lands; its base id must be the one the image claims.
 */
export async function pullBase(opts: BasePullOptions): Promise<BasePullMessage> {
  const { root } = opts;
  const progress = opts.progress ?? silent;
  const client = await openGlance(session(opts));
  const image = await findBaseImage(client, opts.ref);
  const id = packageBaseId(image);
  const result = {
    message_type: 'base_pull' as const,
    id,
    name: prop(image, 'cloudlet_base_name'),
    image_id: image.id,
    glance: client.endpoint,
  };
  if (await showBase(root, id).catch(() => undefined)) return { ...result, added: false };
  await mkdir(tmpDir(root), { recursive: true });
  const fetched = await fetchToFile(client.fileUrl(image.id), tmpDir(root), progress, PACKAGE_TIMEOUT_MS, {
    headers: client.authHeaders(),
    sha256: sha256Of(image),
  });
  try {
    if (image.size !== null && fetched.bytes !== image.size) {
      throw new NetworkError(
        `download of Glance image ${image.id} ended after ${fetched.bytes} of ${image.size} bytes`,
      );
    }
    // Checked like any package: the trust store applies (unsigned or badly signed: refused).
    const r = await importPackage(root, fetched.path, { progress, trust: await loadTrustedKeys() });
    if (r.id !== id) {
      if (r.added) await removeBase(root, r.id);
      throw new CorruptInputError(
        `Glance image ${image.id} holds base ${r.id.slice(0, 12)}, not ${id.slice(0, 12)} as it claims`,
        { image: image.id },
      );
    }
    return { ...result, added: r.added };
  } catch (err) {
    // importPackage names the temporary download; name the image instead.
    if (err instanceof CorruptInputError && err.message.startsWith(fetched.path)) {
      throw new CorruptInputError(`Glance image ${image.id}${err.message.slice(fetched.path.length)}`, {
        image: image.id,
      });
    }
    throw err;
  } finally {
    await fetched.remove();
  }
}

export interface OverlayPushMessage {
  message_type: 'overlay_push';
  image_id: string;
  url: string;
  glance: string;
  base_id: string;
  name: string;
  size: number;
  sha256: string;
}

export interface OverlayPushOptions extends GlanceOptions {
  file: string;
  /** Image name (default: the file name). */
  name?: string;
  visibility?: string;
  progress?: Progress;
}

/**
 * `overlay push`: uploads an overlay file as one image. Its header, footer and index are checked
 * first: a file that is not an overlay is refused before anything is created in Glance.
 */
export async function pushOverlay(opts: OverlayPushOptions): Promise<OverlayPushMessage> {
  const { file } = opts;
  const reader = await OverlayReader.open(file);
  const { header, fileSize } = reader;
  await reader.close();
  const client = await openGlance(session(opts));
  const name = opts.name ?? basename(file);
  const up = await uploadOverlay(
    client,
    {
      baseId: header.base.id,
      version: `${header.version[0]}.${header.version[1]}`,
      resumable: header.targets.some((t) => t.kind === 'ram'),
      machine: header.memory?.machine,
    },
    {
      name,
      data: () => createReadStream(file),
      size: fileSize,
      visibility: opts.visibility,
      progress: opts.progress ?? silent,
    },
  );
  return {
    message_type: 'overlay_push',
    image_id: up.id,
    url: glanceRef(up.id),
    glance: client.endpoint,
    base_id: header.base.id,
    name,
    size: up.bytes,
    sha256: up.sha256,
  };
}

/** `overlay list`: the overlays in Glance, all or those made for one base. */
export async function listOverlays(
  opts: GlanceOptions & { base?: string } = {},
): Promise<{ message_type: 'overlay_list'; overlays: GlanceOverlay[] }> {
  const client = await openGlance(session(opts));
  return { message_type: 'overlay_list', overlays: await listOverlayImages(client, opts.base) };
}

/** `overlay rm`: deletes an overlay image (and nothing that is not one). */
export async function removeOverlay(
  ref: string,
  opts: GlanceOptions = {},
): Promise<{ message_type: 'overlay_rm'; image_id: string }> {
  const client = await openGlance(session(opts));
  return { message_type: 'overlay_rm', image_id: await removeOverlayImage(client, ref) };
}
