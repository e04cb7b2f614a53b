import Glibc

/// Threads of the engine's own (reapers, writers, signal handlers), started detached:
/// each ends when its body returns, and whatever the body captures lives until then.
public enum DetachedThread {
    /// Starts a thread that runs `body` once. Throws when the thread cannot be made.
    public static func start(_ body: @escaping () -> Void) throws(SystemError) {
        let box = Unmanaged.passRetained(Body(body))
        var thread = pthread_t()
        let r = pthread_create(&thread, nil, { argument in
            Unmanaged<Body>.fromOpaque(argument!).takeRetainedValue().run()
            return nil
        }, box.toOpaque())
        guard r == 0 else {
            box.release()
            throw SystemError(SystemError.Code(rawValue: r), "pthread_create")
        }
        pthread_detach(thread)
    }

    private final class Body {
        let run: () -> Void
        init(_ run: @escaping () -> Void) { self.run = run }
    }
}
