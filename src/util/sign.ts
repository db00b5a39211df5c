/**
 * Ed25519 keys and signatures (node:crypto, no dependency): key files, key ids, the trust store,
 * and signing / verifying a 32-byte digest. What is signed is the business of each format
 * (overlay/signature.ts: an overlay header; base/package-signature.ts: a base package manifest);
 * each hashes its own domain string with its payload, so a signature of one kind can never pass
 * for the other.
 *
 * Files: `NAME.key` is the private key (PKCS#8 PEM, mode 0600), `NAME.pub` the public key (SPKI
 * PEM). A key id is the SHA-256 of the raw 32-byte public key, hex. Trusted keys: every `--trust
 * FILE` plus every `*.pub` in `$XDG_CONFIG_HOME/cloudlet-overlay/trusted/`
 * (`~/.config/cloudlet-overlay/trusted/`); the signer name shown is the file name without `.pub`.
 */
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  sign,
  verify,
  type KeyObject,
} from 'node:crypto';
import { constants } from 'node:fs';
import { open, readdir, rename, rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { BusyError, NotFoundError, UntrustedError, UsageError, classifyFsError } from './errors.js';

export const SIG_ALG = 'ed25519';
/** Hex length of an ed25519 signature (64 bytes). */
export const SIG_HEX = 128;
const KEY_ID = /^[0-9a-f]{64}$/;
/** A key file is a few hundred bytes; anything much larger is not one. */
const MAX_KEY_FILE = 64 * 1024;

export interface SigningKey {
  /** The private key. */
  key: KeyObject;
  keyId: string;
  /** The key file's name without `.key`: recorded as `signer` (informational, signed). */
  name: string;
  path: string;
}

export interface TrustedKey {
  key: KeyObject;
  keyId: string;
  /** The public key file's name without `.pub`. */
  name: string;
  path: string;
}

/** The SHA-256 of the raw 32-byte ed25519 public key, hex. */
export function keyIdOf(publicKey: KeyObject): string {
  const jwk = publicKey.export({ format: 'jwk' });
  if (jwk.kty !== 'OKP' || jwk.crv !== 'Ed25519' || typeof jwk.x !== 'string') {
    throw new UsageError('not an ed25519 key');
  }
  return createHash('sha256').update(Buffer.from(jwk.x, 'base64url')).digest('hex');
}

export function isKeyId(s: string): boolean {
  return KEY_ID.test(s);
}

/** Signs a 32-byte digest; returns the signature as 128 hex digits. */
export function signDigest(key: SigningKey, digest: Buffer): string {
  return sign(null, digest, key.key).toString('hex');
}

/** True when `sigHex` is `key`'s signature of `digest`. */
export function verifyDigest(key: KeyObject, digest: Buffer, sigHex: string): boolean {
  if (!/^[0-9a-f]{128}$/.test(sigHex)) return false;
  try {
    return verify(null, digest, key, Buffer.from(sigHex, 'hex'));
  } catch {
    return false;
  }
}

export interface GeneratedKey {
  message_type: 'key_generate';
  key_id: string;
  private_key: string;
  public_key: string;
}

/**
 * Writes `<prefix>.key` (0600) and `<prefix>.pub`. Refuses (BusyError) when either exists, unless
 * `force`. Each file appears complete (temp name + rename) or not at all.
 */
export async function generateKeyFiles(prefix: string, force = false): Promise<GeneratedKey> {
  const name = basename(prefix);
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) {
    throw new UsageError(`key name ${JSON.stringify(name)}: use letters, digits, '.', '_' or '-' (at most 64)`);
  }
  const keyPath = `${prefix}.key`;
  const pubPath = `${prefix}.pub`;
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const files: Array<[string, string, number]> = [
    [keyPath, privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(), 0o600],
    [pubPath, publicKey.export({ format: 'pem', type: 'spki' }).toString(), 0o644],
  ];
  if (!force) {
    for (const [p] of files) {
      const exists = await open(p, 'r').then(
        async (h) => {
          await h.close();
          return true;
        },
        () => false,
      );
      if (exists) throw new BusyError(`${p} already exists (use --force to replace it)`, { path: p });
    }
  }
  for (const [p, text, mode] of files) {
    const temp = join(dirname(p), `.${basename(p)}.tmp-${process.pid}`);
    try {
      // O_EXCL and the mode at creation: the private key is never readable by others, not even briefly.
      const h = await open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode);
      try {
        await h.writeFile(text);
        await h.sync();
      } finally {
        await h.close();
      }
      await rename(temp, p);
    } catch (err) {
      await rm(temp, { force: true });
      throw classifyFsError(err, p);
    }
  }
  return { message_type: 'key_generate', key_id: keyIdOf(publicKey), private_key: keyPath, public_key: pubPath };
}

async function readKeyFile(path: string, what: string): Promise<string> {
  let h;
  try {
    h = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    throw new NotFoundError(`${what} ${path} cannot be read: ${(err as Error).message}`, { path });
  }
  try {
    const st = await h.stat();
    if (!st.isFile()) throw new NotFoundError(`${what} ${path} is not a regular file`, { path });
    if (st.size > MAX_KEY_FILE) throw new UsageError(`${what} ${path} is not a key file (too large)`, { path });
    return await h.readFile('utf8');
  } finally {
    await h.close();
  }
}

/** A private key file (`key generate`'s NAME.key) for --sign. */
export async function loadSigningKey(path: string): Promise<SigningKey> {
  const text = await readKeyFile(path, 'signing key');
  let key: KeyObject;
  try {
    key = createPrivateKey(text);
  } catch {
    throw new UsageError(`${path} is not a private key (expected the NAME.key of \`key generate\`)`, { path });
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new UsageError(`${path}: not an ed25519 key`, { path });
  return { key, keyId: keyIdOf(createPublicKey(key)), name: basename(path).replace(/\.key$/, ''), path };
}

/** A public key file (NAME.pub). A private key file is refused: trust needs no secret. */
export async function loadPublicKey(path: string): Promise<TrustedKey> {
  const text = await readKeyFile(path, 'public key');
  if (/PRIVATE KEY/.test(text)) {
    throw new UsageError(`${path} is a private key: trust the public key (NAME.pub) instead`, { path });
  }
  let key: KeyObject;
  try {
    key = createPublicKey(text);
  } catch {
    throw new UsageError(`${path} is not a public key (expected the NAME.pub of \`key generate\`)`, { path });
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new UsageError(`${path}: not an ed25519 key`, { path });
  return { key, keyId: keyIdOf(key), name: basename(path).replace(/\.pub$/, ''), path };
}

/** `$XDG_CONFIG_HOME/cloudlet-overlay/trusted` (default `~/.config/cloudlet-overlay/trusted`). */
export function trustStoreDir(env: NodeJS.ProcessEnv = process.env): string {
  const config = env.XDG_CONFIG_HOME || join(homedir(), '.config');
  return join(config, 'cloudlet-overlay', 'trusted');
}

/**
 * The trusted keys: the files given (--trust, repeatable) and every `*.pub` in the trust store
 * directory (missing: none). An empty list means no trust is configured: unsigned input is
 * accepted. A file that is not a public key is a usage error, never silently skipped.
 */
export async function loadTrustedKeys(
  files: readonly string[] = [],
  storeDir = trustStoreDir(),
): Promise<TrustedKey[]> {
  const paths = [...files];
  const names = await readdir(storeDir).catch(() => [] as string[]);
  for (const n of names.sort()) if (n.endsWith('.pub')) paths.push(join(storeDir, n));
  const out: TrustedKey[] = [];
  for (const p of paths) {
    const k = await loadPublicKey(p);
    if (!out.some((o) => o.keyId === k.keyId)) out.push(k);
  }
  return out;
}

/** The trusted key with this id, if any. */
export function trustedKey(trusted: readonly TrustedKey[], keyId: string): TrustedKey | undefined {
  return trusted.find((k) => k.keyId === keyId);
}

/** Reads a key id or file argument for messages: the first 16 hex digits. */
export function shortKeyId(keyId: string): string {
  return keyId.slice(0, 16);
}

/** For tests and callers that hold a key in memory. */
export function signingKeyFrom(privatePem: string, name = 'key'): SigningKey {
  const key = createPrivateKey(privatePem);
  return { key, keyId: keyIdOf(createPublicKey(key)), name, path: '' };
}

export function trustedKeyFrom(publicPem: string, name = 'key'): TrustedKey {
  const key = createPublicKey(publicPem);
  return { key, keyId: keyIdOf(key), name, path: '' };
}

/** The public half of a signing key, as a trusted key (the writer re-reads what it signed). */
export function publicOf(k: SigningKey): TrustedKey {
  return { key: createPublicKey(k.key), keyId: k.keyId, name: k.name, path: k.path };
}

/** What a reader found out about a signature (an overlay header's, a base package's). */
export interface SignatureStatus {
  signed: boolean;
  key_id?: string;
  /** The signer name the signed document records (covered by the signature). */
  signer?: string;
  /**
   * verified: by a trusted key; bad: a trusted key's signature that does not verify;
   * untrusted_key: signed by a key not among the trusted ones; unverified: signed, but no key is
   * trusted; unsigned.
   */
  status: 'verified' | 'bad' | 'untrusted_key' | 'unverified' | 'unsigned';
  /** The name of the trusted key file that verified it. */
  trusted_as?: string;
}

/**
 * The status of a signature (`sig` over `digest` by `keyId`, or none) against the trusted keys.
 * `complete` false marks a signature that does not cover everything it must (never good enough).
 */
export function signatureStatus(
  sig: { key_id: string; sig: string; signer?: string } | undefined,
  digest: () => Buffer,
  trusted: readonly TrustedKey[],
  complete = true,
): SignatureStatus {
  if (!sig) return { signed: false, status: 'unsigned' };
  const base = { signed: true, key_id: sig.key_id, ...(sig.signer !== undefined ? { signer: sig.signer } : {}) };
  if (trusted.length === 0) return { ...base, status: 'unverified' };
  const key = trustedKey(trusted, sig.key_id);
  if (!key) return { ...base, status: 'untrusted_key' };
  const ok = complete && verifyDigest(key.key, digest(), sig.sig);
  return { ...base, status: ok ? 'verified' : 'bad', ...(ok ? { trusted_as: key.name } : {}) };
}

/**
 * The readers' policy: with trusted keys configured, anything but a verified signature is an
 * UntrustedError naming `what`; with none, everything passes. Returns the status.
 */
export function enforceTrust(st: SignatureStatus, trusted: readonly TrustedKey[], what: string): SignatureStatus {
  const n = trusted.length;
  const keys = `${n} trusted key${n === 1 ? '' : 's'} configured`;
  const who = `key ${st.key_id?.slice(0, 16) ?? ''}${st.signer !== undefined ? ` (signer ${JSON.stringify(st.signer)})` : ''}`;
  const details = { key_id: st.key_id ?? null, signature: st.status };
  switch (st.status) {
    case 'unsigned':
      if (n > 0) throw new UntrustedError(`${what} is not signed, and ${keys}: refused`, details);
      return st;
    case 'untrusted_key':
      throw new UntrustedError(`${what} is signed by ${who}, which is not trusted (${keys})`, details);
    case 'bad':
      throw new UntrustedError(`${what}: the signature by ${who} does not verify (tampered or damaged)`, details);
    case 'verified':
    case 'unverified':
      return st;
  }
}
