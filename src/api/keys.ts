/**
 * Keys and trust for the CLI: `key generate`, the signing key of `--sign`, and the trusted keys
 * of `--trust` plus the trust store directory (util/sign.ts has the details).
 */
import {
  generateKeyFiles,
  loadSigningKey,
  loadTrustedKeys,
  trustStoreDir,
  type GeneratedKey,
  type SigningKey,
  type TrustedKey,
} from '../util/sign.js';

export type { SigningKey, TrustedKey } from '../util/sign.js';

/** `key generate NAME`: NAME.key (0600) and NAME.pub; refused when they exist unless `force`. */
export async function generateKey(prefix: string, force = false): Promise<GeneratedKey & { trust_store: string }> {
  return { ...(await generateKeyFiles(prefix, force)), trust_store: trustStoreDir() };
}

/** The key of `--sign FILE`, or undefined without the flag. */
export async function signingKey(path: string | undefined): Promise<SigningKey | undefined> {
  return path === undefined ? undefined : loadSigningKey(path);
}

/** `--trust FILE` (repeatable) plus every *.pub in the trust store directory. */
export async function trustedKeys(files: readonly string[] | undefined): Promise<TrustedKey[]> {
  return loadTrustedKeys(files ?? []);
}
