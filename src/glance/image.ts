/**
 * Cloudlet images in Glance: the cloudlet_type values, glance://IMAGE_ID references, and the
 * checks every reader applies to an image (its type, complete upload, recorded sha256).
 */
import { NotFoundError, UsageError } from '../util/errors.js';
import { glanceSession, type SessionOptions } from './auth.js';
import { GlanceClient, type GlanceImage } from './client.js';

export const CloudletType = { basePackage: 'base_package', overlay: 'overlay' } as const;

export const GLANCE_SCHEME = 'glance://';
export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const BASE_ID = /^[0-9a-f]{64}$/;

export function isGlanceRef(s: string): boolean {
  return s.toLowerCase().startsWith(GLANCE_SCHEME);
}

/** glance://IMAGE_ID → IMAGE_ID. */
export function glanceImageId(ref: string): string {
  const id = isGlanceRef(ref) ? ref.slice(GLANCE_SCHEME.length).replace(/\/+$/, '') : ref;
  if (!UUID.test(id)) throw new UsageError(`not a Glance image reference: ${ref} (expected glance://IMAGE_ID, a UUID)`);
  return id.toLowerCase();
}

export function glanceRef(imageId: string): string {
  return `${GLANCE_SCHEME}${imageId}`;
}

export async function openGlance(opts: SessionOptions = {}): Promise<GlanceClient> {
  return new GlanceClient(await glanceSession(opts));
}

export function prop(image: GlanceImage, key: string): string | undefined {
  const v = image[key];
  return typeof v === 'string' ? v : undefined;
}

/** The sha256 of an image's data when Glance (or our push) recorded one. */
export function sha256Of(image: GlanceImage): string | undefined {
  if (image.os_hash_algo === 'sha256' && image.os_hash_value) return image.os_hash_value;
  const ours = prop(image, 'cloudlet_sha256');
  return ours && /^[0-9a-f]{64}$/.test(ours) ? ours : undefined;
}

/** Checks that `image` is a complete image of the given cloudlet type. */
export function expectType(client: GlanceClient, image: GlanceImage, type: string): void {
  const actual = prop(image, 'cloudlet_type');
  if (actual !== type) {
    throw new UsageError(
      `Glance image ${image.id} is ${actual ? `a cloudlet ${actual}` : 'not a cloudlet image (no cloudlet_type)'}, ` +
        `not ${type === CloudletType.overlay ? 'an overlay' : 'a base package'}`,
      { image: image.id, cloudlet_type: actual ?? null },
    );
  }
  if (image.status !== 'active') {
    throw new NotFoundError(`Glance image ${image.id} at ${client.endpoint} has no data yet (status ${image.status})`, {
      image: image.id,
      status: image.status,
    });
  }
}
