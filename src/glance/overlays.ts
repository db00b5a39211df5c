/**
 * Overlays in Glance: one image per overlay file (cloudlet_type=overlay, cloudlet_base_id).
 * resolveOverlaySource() turns glance://IMAGE_ID into a URL + headers after checking the
 * image's type and base, for the synthesis pipeline to fetch (Glance honours Range requests).
 */
import { createReadStream } from 'node:fs';
import { basename } from 'node:path';
import { TOOL } from '../api/version.js';
import { OverlayReader } from '../overlay/reader.js';
import { BaseMismatchError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import type { SessionOptions } from './auth.js';
import { findBaseImage } from './bases.js';
import { BASE_ID, CloudletType, expectType, glanceImageId, glanceRef, openGlance, prop, sha256Of } from './image.js';
import { uploadImage } from './upload.js';

export interface OverlaySource {
  /** GET this (with `headers`) for the overlay's bytes; Range requests are honoured. */
  url: string;
  headers: Record<string, string>;
  size?: number;
  /** sha256 of the whole file, when known (os_hash_value with hashing_algorithm = sha256). */
  sha256?: string;
  imageId: string;
  /** The base the overlay was made for (cloudlet_base_id). */
  baseId?: string;
}

export interface ResolveOptions extends SessionOptions {
  /** Refuse (BaseMismatchError) an overlay made for another base, before any download. */
  expectBase?: string;
}

/** glance://IMAGE_ID → where to read the overlay, after checking it is one (and for which base). */
export async function resolveOverlaySource(ref: string, opts: ResolveOptions = {}): Promise<OverlaySource> {
  const id = glanceImageId(ref);
  const client = await openGlance(opts);
  const image = await client.getImage(id);
  expectType(client, image, CloudletType.overlay);
  const baseId = prop(image, 'cloudlet_base_id');
  if (opts.expectBase && baseId !== opts.expectBase) {
    throw new BaseMismatchError(
      `Glance image ${id} is an overlay for base ${(baseId ?? 'unknown').slice(0, 12)}, ` +
        `not for base ${opts.expectBase.slice(0, 12)}`,
      { image: id, expected_base: baseId ?? null, actual_base: opts.expectBase },
    );
  }
  return {
    url: client.fileUrl(id),
    headers: client.authHeaders(),
    size: image.size ?? undefined,
    sha256: sha256Of(image),
    imageId: id,
    baseId,
  };
}

export interface OverlayPushResult {
  message_type: 'overlay_push';
  image_id: string;
  url: string;
  glance: string;
  base_id: string;
  name: string;
  size: number;
  sha256: string;
}

/** Uploads an overlay file (its header, footer and index checked first) as one image. */
export async function pushOverlay(
  file: string,
  opts: SessionOptions & { name?: string; visibility?: string; progress?: Progress } = {},
): Promise<OverlayPushResult> {
  const progress = opts.progress ?? silent;
  const reader = await OverlayReader.open(file);
  const { header, fileSize } = reader;
  await reader.close();
  const client = await openGlance(opts);
  const name = opts.name ?? basename(file);
  const properties: Record<string, string> = {
    cloudlet_type: CloudletType.overlay,
    cloudlet_base_id: header.base.id,
    cloudlet_overlay_version: `${header.version[0]}.${header.version[1]}`,
    cloudlet_resumable: String(header.targets.some((t) => t.kind === 'ram')),
    cloudlet_creator: TOOL,
  };
  if (header.memory) properties.cloudlet_machine = header.memory.machine;
  const up = await uploadImage(client, {
    image: { name, disk_format: 'raw', container_format: 'bare', visibility: opts.visibility, properties },
    data: () => createReadStream(file),
    size: fileSize,
    label: `uploading ${name}`,
    progress,
  });
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

export interface GlanceOverlay {
  image_id: string;
  url: string;
  name: string | null;
  base_id?: string;
  size: number | null;
  status: string;
  created_at: string;
}

/** Overlays in Glance, all or those made for one base. */
export async function listOverlays(opts: SessionOptions & { base?: string } = {}): Promise<GlanceOverlay[]> {
  const client = await openGlance(opts);
  const filters: Record<string, string> = { cloudlet_type: CloudletType.overlay };
  if (opts.base) {
    // A full id as is; a name or id prefix through the base packages in Glance.
    filters.cloudlet_base_id = BASE_ID.test(opts.base)
      ? opts.base
      : (prop(await findBaseImage(client, opts.base), 'cloudlet_base_id') ?? opts.base);
  }
  const images = await client.listImages(filters);
  return images.map((i) => ({
    image_id: i.id,
    url: glanceRef(i.id),
    name: i.name,
    base_id: prop(i, 'cloudlet_base_id'),
    size: i.size,
    status: i.status,
    created_at: i.created_at,
  }));
}

/** Deletes an overlay image (refusing to delete anything that is not one). */
export async function removeOverlay(ref: string, opts: SessionOptions = {}): Promise<{ image_id: string }> {
  const id = glanceImageId(ref);
  const client = await openGlance(opts);
  const image = await client.getImage(id);
  // Any overlay image, also one whose upload never finished; nothing else.
  if (prop(image, 'cloudlet_type') !== CloudletType.overlay) expectType(client, image, CloudletType.overlay);
  await client.deleteImage(id);
  return { image_id: id };
}
